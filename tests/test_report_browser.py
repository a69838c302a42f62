"""The routing report: a self-contained HTML file checked as text and in real headless Chromium, the PNG plots, and
the `moekit report` command. Models are the quick demo's, so the routing is a trained router's, not random."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit import compose
from moekit.analysis import AnalysisError, capture_routing
from moekit.cli import app
from moekit.demo import run_demo
from moekit.views import expert_colours, render_report, write_report
from moekit.views.plots import (
    plot_gate_strength, plot_routing_by_label, plot_token_strip, plot_utilisation_heatmap,
)

TEXTS = ["def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog.", "17 + 25 = 42"]
LABELS = ["code", "prose", "arithmetic"]
XSS = "x = '<script>alert(1)</script>' & <b>bold</b>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo's models, a BTS composition of its experts with non-trivial stitches, and a tokenizer."""
    root = tmp_path_factory.mktemp("report")
    run_demo(root, quick=True, progress=False)
    routed = root / "btx+routers"
    tokenizer_folder = routed if (routed / "tokenizer.json").is_file() else root / "btx"
    if not (routed / "tokenizer.json").is_file():  # the CLI needs the tokenizer beside the weights
        AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(routed)
    bts = compose({"method": "bts", "base": {"name": "seed", "source": str(root / "seed")},
                   "experts": [{"name": n, "source": str(root / "experts" / n)} for n in LABELS], "stitch_freq": 1},
                  root / "bts", progress=False)
    return root, AutoTokenizer.from_pretrained(tokenizer_folder), bts


@pytest.fixture(scope="module")
def btx_trace(demo):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx+routers")
    return capture_routing(model, tokenizer, TEXTS, LABELS)


@pytest.fixture(scope="module")
def bts_trace(demo):
    _, tokenizer, bts = demo
    model = AutoModelForCausalLM.from_pretrained(bts)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # at initialisation every gate is the identity on the hub: nothing to see
        for name, parameter in model.stitches.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (1.0 if "scale" in name else 0.5))
    return capture_routing(model, tokenizer, TEXTS[:2], LABELS[:2])


def _token_count(trace) -> int:
    table = trace.routes if len(trace.routes) else trace.gates
    return len(table.drop_duplicates(["text_index", "position"]))


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside <script> elements."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# The HTML as text


def test_report_is_self_contained_and_has_every_section(btx_trace):
    page = render_report(btx_trace, title="demo <btx>")
    parsed = _parse(page)
    for tag, attrs in parsed.tags:
        for name in ("src", "href"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, attrs)
        assert not (tag == "link" and "stylesheet" in (attrs.get("rel") or "")), "styles must be inline"
    assert [attrs.get("src") for tag, attrs in parsed.tags if tag == "script"] == [None, None]
    assert "<title>demo &lt;btx&gt;</title>" in page
    ids = {attrs.get("id") for _, attrs in parsed.tags}
    for section in ("tokens-section", "utilisation-section", "entropy-section", "top1-section", "dead-section",
                    "labels-section", "router-select"):
        assert section in ids, section
    assert "gates-section" not in ids  # btx has no stitches
    spans = [attrs for tag, attrs in parsed.tags if tag == "span" and attrs.get("class") == "tok"]
    assert len(spans) == _token_count(btx_trace)
    options = [attrs["value"] for tag, attrs in parsed.tags if tag == "option"]
    assert options == ["all"] + [str(i) for i in range(len(btx_trace.routers))]
    data = json.loads(parsed.scripts[0])
    assert data["experts"] == LABELS and len(data["routes"]) == len(TEXTS)
    assert [r["name"] for r in data["routers"]] == btx_trace.routers
    first = btx_trace.routes[(btx_trace.routes.text_index == 0) & (btx_trace.routes.router == btx_trace.routers[0])]
    assert data["routes"][0][0]["e"] == [list(e) for e in first["experts"]]
    assert 'class="truncated-note"' not in page
    # Every heatmap cell's hover title names its own router and expert (each expert once per router).
    for name in LABELS:
        assert page.count(f" / {name}: ") == len(btx_trace.routers), name


def test_truncated_text_gets_a_visible_note(demo):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx+routers")
    trace = capture_routing(model, tokenizer, ["word " * 200, "short text"], max_tokens=16)
    page = render_report(trace)
    assert page.count('<p class="truncated-note">') == 1  # under the long text only
    assert "only the first 16 tokens" in page and "1 text(s) truncated to 16 tokens" in page
    assert len([a for t, a in _parse(page).tags if a.get("class") == "tok"]) == _token_count(trace)


def test_token_text_is_escaped(demo):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx+routers")
    page = render_report(capture_routing(model, tokenizer, [XSS], ["<img src=x onerror=alert(2)>"]))
    parsed = _parse(page)
    assert sum(tag == "script" for tag, _ in parsed.tags) == 2  # only the report's data and code
    assert not any(tag == "img" for tag, _ in parsed.tags) and "<b>bold" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    json.loads(parsed.scripts[0])  # the data block survives labels and tokens with "<", ">" and "&"
    assert "</script>" not in parsed.scripts[0] and "<img" not in parsed.scripts[0]


def test_bts_report_shows_gates(bts_trace, tmp_path):
    path = write_report(bts_trace, tmp_path / "sub" / "bts.html")
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    ids = {attrs.get("id") for _, attrs in parsed.tags}
    assert "gates-section" in ids and "gate-select" in ids and "router-select" not in ids
    gate_spans = [attrs for tag, attrs in parsed.tags if tag == "span" and attrs.get("class") == "gtok"]
    assert len(gate_spans) == _token_count(bts_trace)
    data = json.loads(parsed.scripts[0])
    streams = {k["stream"] for k in data["gateKeys"]}
    assert streams == {"hub", *LABELS} and {k["direction"] for k in data["gateKeys"]} == {"broadcast", "merge"}
    means = [m for text in data["gates"] for key in text for m, _ in key]
    assert max(means) - min(means) > 0.05  # randomised stitches: gates differ between tokens and streams


# ----------------------------------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser():
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"headless browser tests need chromium and chromedriver on PATH (found chromium={chromium}, "
                    f"chromedriver={driver_path}); on Debian: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def _open(driver, path):
    driver.get(path.resolve().as_uri())
    driver.get_log("browser")  # what an earlier page logged is not this page's


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _backgrounds(driver, css: str) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), s => s.style.backgroundColor);", css)


def _expected_rgb(colour: str, probability: float) -> tuple[int, ...]:
    strength = 0.15 + 0.75 * round(probability, 3)
    return tuple(round(255 + (int(colour[i:i + 2], 16) - 255) * strength) for i in (1, 3, 5))


def test_browser_colours_every_token_and_follows_the_router_selector(btx_trace, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, write_report(btx_trace, tmp_path / "report.html"))
    spans = browser.find_elements(By.CSS_SELECTOR, "span.tok")
    assert len(spans) == _token_count(btx_trace)
    assert "".join(s.get_attribute("textContent") for s in spans) == "".join(TEXTS)
    everything = _backgrounds(browser, "span.tok")
    assert all(colour.startswith("rgb(") for colour in everything)

    selector = Select(browser.find_element(By.ID, "router-select"))
    selector.select_by_value("1")
    one_router = _backgrounds(browser, "span.tok")
    assert one_router != everything
    # Each token has the colour of router 1's top expert, at that expert's probability.
    rows = btx_trace.routes[btx_trace.routes.router == btx_trace.routers[1]].sort_values(["text_index", "position"])
    colours = expert_colours(len(LABELS))
    for shown, experts, probs in zip(one_router, rows["experts"], rows["probs"]):
        got = tuple(int(v) for v in shown[4:-1].split(","))
        want = _expected_rgb(colours[experts[0]], probs[experts[0]])
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1, (shown, want)

    # Clicking a heatmap row selects that router too; hovering a token lists every router.
    browser.find_element(By.CSS_SELECTOR, 'g.row[data-router="2"]').click()
    assert selector.first_selected_option.get_attribute("value") == "2"
    ActionChains(browser).move_to_element(spans[3]).perform()
    tooltip = browser.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed()
    assert tooltip.text.count("·") >= len(btx_trace.routers) and "all routers:" in tooltip.text
    assert not _severe(browser)


def test_browser_shows_script_tokens_as_text(demo, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx+routers")
    trace = capture_routing(model, tokenizer, [XSS])
    _open(browser, write_report(trace, tmp_path / "xss.html"))
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    block = browser.find_element(By.CSS_SELECTOR, "#tokens-section .tokens")
    assert XSS in block.get_attribute("textContent")
    assert "<script>alert(1)</script>" in block.text
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "span.tok")) == _token_count(trace)
    assert not _severe(browser)


def test_browser_bts_gate_strip_follows_the_stitch_selector(bts_trace, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, write_report(bts_trace, tmp_path / "bts.html"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "span.gtok")) == _token_count(bts_trace)
    first = _backgrounds(browser, "span.gtok")
    assert all(colour.startswith("rgb(") for colour in first)
    selector = Select(browser.find_element(By.ID, "gate-select"))
    changed = False
    for index in range(1, len(selector.options)):
        selector.select_by_index(index)
        changed |= _backgrounds(browser, "span.gtok") != first
    assert changed
    assert not _severe(browser)


# ----------------------------------------------------------------------------------------------------------------------
# PNG plots


def _assert_png(path, min_bytes: int = 5000) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200 and pixels.std() > 0.05  # not a blank canvas


def test_png_plots(btx_trace, bts_trace, tmp_path):
    written = [plot_utilisation_heatmap(btx_trace, tmp_path / "a" / "utilisation.png"),
               plot_routing_by_label(btx_trace, tmp_path / "labels.png"),
               plot_token_strip(btx_trace, tmp_path / "strip.png", text_index=2),
               plot_gate_strength(bts_trace, tmp_path / "gates.png")]
    for path in written:
        _assert_png(path)
    with pytest.raises(AnalysisError, match="needs routers"):
        plot_utilisation_heatmap(bts_trace, tmp_path / "no.png")
    with pytest.raises(AnalysisError, match="out of range"):
        plot_token_strip(btx_trace, tmp_path / "no.png", text_index=3)
    with pytest.raises(AnalysisError, match="stitch gates"):
        plot_gate_strength(btx_trace, tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


def test_routing_by_label_needs_labels(demo, tmp_path):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "traditional+routers")
    trace = capture_routing(model, tokenizer, TEXTS[:1])
    with pytest.raises(AnalysisError, match="labelled texts"):
        plot_routing_by_label(trace, tmp_path / "labels.png")
    _assert_png(plot_token_strip(trace, tmp_path / "strip.png"))
    assert "labels-section" not in render_report(trace)


# ----------------------------------------------------------------------------------------------------------------------
# The command


def test_report_command(demo, tmp_path):
    root, _, _ = demo
    code = tmp_path / "code.py"
    code.write_text(TEXTS[0] * 40, encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(root / "btx+routers"), "--text", TEXTS[1], "--file", str(code),
                                      "--label", "prose", "--label", "code", "--max-tokens", "40",
                                      "-o", str(tmp_path / "out" / "report.html"), "--png-dir", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert f"--file {code} was truncated to its first 40 tokens" in result.output
    assert page.count('<p class="truncated-note">') == 1 and "labels-section" in page
    names = ["utilisation.png", "routing_by_label.png", "token_strip_1.png", "token_strip_2.png"]
    for name in names:
        assert f"wrote {tmp_path / 'png' / name}" in result.output
        _assert_png(tmp_path / "png" / name)
    assert f"wrote {tmp_path / 'out' / 'report.html'}" in result.output


@pytest.mark.parametrize("case", ["dense", "empty", "no-text", "labels", "no-tokenizer"])
def test_report_command_refuses_bad_input(demo, tmp_path, case):
    root, _, _ = demo
    folder = root / "btx+routers"
    if case == "no-tokenizer":
        folder = tmp_path / "bare"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(root / "btx+routers" / name, folder / name)
    arguments = {"dense": [str(root / "seed"), "--text", "hello"], "empty": [str(folder), "--text", "  \n"],
                 "no-text": [str(folder)], "labels": [str(folder), "--text", "a", "--label", "x", "--label", "y"],
                 "no-tokenizer": [str(folder), "--text", "hello"]}[case]
    result = CliRunner().invoke(app, ["report", *arguments, "-o", str(tmp_path / "r.html")])
    expected = {"dense": "not a composed one", "empty": "must be non-empty", "no-text": "at least one --text",
                "labels": "one label per text", "no-tokenizer": f"'{folder}' has no usable tokenizer"}[case]
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "r.html").exists()
