"""The live app: a real composed model served on 127.0.0.1, driven over HTTP as a browser or a script would."""

from __future__ import annotations

import html
import json
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit import SourceError
from moekit.analysis import AnalysisError, capture_routing
from moekit.cli import app as cli
from moekit.demo import run_demo
from moekit.views import app as app_module
from moekit.views.app import serve
from moekit.views.html_report import render_report

PROMPT = "def add(a, b):\n    return a + b  # 17 < 25 & 'x'"
TIMEOUT = 60  # seconds, per request
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy, even if the env sets one
_FORM = re.compile(r'<form class="mk-app-form".*?</form>', re.DOTALL)
_FORM_STYLE = re.compile(r"<style>\.mk-app-form\{.*?</style>", re.DOTALL)
_TOKEN_SPAN = re.compile(r'<span class="tok" data-text="0" data-pos="(\d+)">(.*?)</span>', re.DOTALL)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    run_demo(root, quick=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(root / "btx", dtype=torch.float32).eval()
    return root, model, AutoTokenizer.from_pretrained(root / "btx")


@pytest.fixture(scope="module")
def server(demo):
    with serve(demo[0] / "btx", port=0) as running:
        yield running


def _request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str, str]:
    """(status, content type, body text); HTTP errors are answers too."""
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with _OPENER.open(request, timeout=TIMEOUT) as response:
            return response.status, response.headers.get_content_type(), response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read().decode("utf-8")


def _post_form(server, fields: dict) -> tuple[int, str, str]:
    return _request(server.url + "analyse", urllib.parse.urlencode(fields).encode(),
                    {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"})


def _post_json(server, payload: dict) -> tuple[int, str, dict]:
    status, kind, text = _request(server.url + "analyse", json.dumps(payload).encode(),
                                  {"Content-Type": "application/json", "Accept": "application/json"})
    return status, kind, json.loads(text)


def _tokens(tokenizer, text: str) -> list[str]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [text[a:b] for a, b in encoded["offset_mapping"]]


def _greedy(model, tokenizer, prompt: str, steps: int) -> str:
    """Reference continuation: argmax of a full forward pass per step (no cache, no `generate`)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    head = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids + new, skip_special_tokens=True)[len(head):]


def _report_part(page: str) -> str:
    """The page without the app's own form and its style: what `render_report` alone produced."""
    assert len(_FORM.findall(page)) == 1 and len(_FORM_STYLE.findall(page)) == 1
    return _FORM_STYLE.sub("", _FORM.sub("", page, count=1), count=1)


def _shown_tokens(page: str) -> list[str]:
    """The token spans of the page, in order (each `<span class="tok" data-pos=i>` holds token i, escaped)."""
    spans = _TOKEN_SPAN.findall(page)
    assert [int(position) for position, _ in spans] == list(range(len(spans)))
    return [html.unescape(text) for _, text in spans]


def test_index_page_has_the_form(server, demo):
    assert server.host == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/" and server.port > 0
    status, kind, page = _request(server.url)
    assert (status, kind) == (200, "text/html")
    assert 'action="/analyse"' in page and 'method="post"' in page and "<textarea" in page and 'name="text"' in page
    assert re.search(r'<input type="number" name="generate"[^>]*value="0"', page)
    assert "<button type=\"submit\">" in page
    assert all(name in page for name in demo[1].config.expert_names) and "btx" in page
    assert _request(server.url + "nothing-here")[0] == 404


def test_prompt_page_is_the_report_of_its_tokens(server, demo):
    _, model, tokenizer = demo
    status, kind, page = _post_form(server, {"text": PROMPT, "generate": "0"})
    assert (status, kind) == (200, "text/html")
    tokens = _tokens(tokenizer, PROMPT)
    assert "".join(tokens) == PROMPT and len(tokens) > 10
    assert _shown_tokens(page) == tokens  # one span per token, in order, escaped (the prompt has <, & and ')
    assert "17 < 25" not in page and html.escape("17 < 25") in page  # nothing unescaped
    # The page is exactly `render_report` of the same capture, plus the app's form (prefilled with the prompt).
    expected = render_report(capture_routing(model, tokenizer, [PROMPT]), title=server.app.title)
    assert _report_part(page) == expected
    textarea = re.search(r"<textarea[^>]*>(.*?)</textarea>", page, re.DOTALL).group(1)
    assert html.unescape(textarea) == PROMPT and "<" not in textarea and "'" not in textarea  # prefilled, escaped


def test_browser_form_newlines_and_default_generation(server, demo):
    """Browsers send textarea lines as CRLF and may leave the number field out: same analysis as the plain text."""
    crlf = _post_form(server, {"text": PROMPT.replace("\n", "\r\n")})
    plain = _post_form(server, {"text": PROMPT, "generate": "0"})
    assert crlf[0] == plain[0] == 200 and crlf[2] == plain[2]


def test_generation_continues_the_prompt_greedily(server, demo):
    _, model, tokenizer = demo
    steps = 6
    continuation = _greedy(model, tokenizer, PROMPT, steps)
    assert continuation
    status, kind, data = _post_json(server, {"text": PROMPT, "generate": steps})
    assert (status, kind) == (200, "application/json")
    assert 1 <= data["generated_tokens"] <= steps and data["generated_text"] == continuation
    assert data["prompt"] == PROMPT and data["text"] == PROMPT + continuation
    analysed = [token["token"] for token in data["tokens"]]
    assert "".join(analysed) == PROMPT + continuation and len(analysed) > len(_tokens(tokenizer, PROMPT))
    # The HTML answer is the report of prompt + continuation.
    status, _, page = _post_form(server, {"text": PROMPT, "generate": str(steps)})
    assert status == 200 and re.search(rf'name="generate"[^>]*value="{steps}"', page)  # the form keeps the request
    trace = capture_routing(model, tokenizer, [PROMPT + continuation])
    assert _report_part(page) == render_report(trace, title=server.app.title)
    assert _shown_tokens(page) == _tokens(tokenizer, PROMPT + continuation)


def test_json_answer_has_the_reductions(server, demo):
    _, model, tokenizer = demo
    status, kind, data = _post_json(server, {"text": PROMPT})
    assert (status, kind) == (200, "application/json")
    names = list(model.config.expert_names)
    assert data["method"] == "btx" and data["experts"] == names and data["generated_tokens"] == 0
    assert data["text"] == PROMPT and data["truncated"] is False
    routers = [name for name, _ in model.routers()]
    assert sorted(data["utilisation"]) == sorted(routers)
    for shares in data["utilisation"].values():
        assert list(shares) == names and sum(shares.values()) == pytest.approx(1.0)
    assert all(0 <= value <= 1 for value in data["mean_token_entropy"].values())
    assert 0 <= data["layer_agreement"] <= 1 and set(data["dead_experts"]) == set(routers)
    tokens = data["tokens"]
    assert [t["token"] for t in tokens] == _tokens(tokenizer, PROMPT)
    assert all(t["dominant"] in names and 0 < t["probability"] <= 1 for t in tokens)
    assert all(PROMPT[t["start"]:t["end"]] == t["token"] for t in tokens)


@pytest.mark.parametrize("request_kind, fields", [
    ("form", {"text": ""}),
    ("form", {"text": "   \r\n ", "generate": "0"}),
    ("json", {"text": ""}),
    ("json", {"generate": 2}),
    ("json", {"text": 42}),
])
def test_empty_text_is_a_bad_request(server, request_kind, fields):
    if request_kind == "json":
        status, kind, data = _post_json(server, fields)
        assert (status, kind) == (400, "application/json") and "text is empty" in data["error"]
    else:
        status, kind, text = _post_form(server, fields)
        assert (status, kind) == (400, "text/plain") and "text is empty" in text


@pytest.mark.parametrize("generate", [-1, 10_000, "many", 1.5, True])
def test_bad_generate_is_a_bad_request(server, generate):
    status, _, data = _post_json(server, {"text": PROMPT, "generate": generate})
    assert status == 400 and "'generate' must be a whole number from 0 to" in data["error"]


def test_bad_bodies(server):
    status, _, text = _request(server.url + "analyse", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in text
    status, _, text = _request(server.url + "analyse", b"text=hi", {"Content-Type": "text/csv"})
    assert status == 415 and "application/json" in text
    status, _, text = _request(server.url + "elsewhere", b"text=hi",
                               {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 404


def test_concurrent_requests_are_serialised(server):
    """Three requests at once: each answered in full and alike (one model, one lock)."""
    answers = [None] * 3

    def ask(i):
        answers[i] = _post_json(server, {"text": PROMPT})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(answer is not None and answer[0] == 200 for answer in answers)
    assert answers[0][2] == answers[1][2] == answers[2][2]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_close_releases_the_port(demo):
    server = serve(demo[0] / "btx")
    port = server.port
    assert _port_open(port) and _request(server.url)[0] == 200
    server.close()
    server.close()  # twice is fine
    assert not _port_open(port)


def test_dense_checkpoint_is_refused(demo):
    root = demo[0]
    with pytest.raises(AnalysisError, match=r"dense llama checkpoint, not a composed one.*moekit compose"):
        serve(root / "seed")
    with pytest.raises(SourceError, match="cannot read a model config"):
        serve(root / "no-such-folder")


def test_cli_app_serves_until_ctrl_c(demo, monkeypatch):
    """`moekit app` prints the URL and serves; Ctrl-C (simulated once a request is answered) stops it."""
    seen = {}

    def one_request_then_ctrl_c(self):
        seen["port"], seen["status"] = self.port, _request(self.url)[0]
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module.AppServer, "wait", one_request_then_ctrl_c)
    result = CliRunner().invoke(cli, ["app", str(demo[0] / "btx"), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert f"at http://127.0.0.1:{seen['port']}/" in result.output and "stopping" in result.output
    assert seen["status"] == 200 and not _port_open(seen["port"])
    dense = CliRunner().invoke(cli, ["app", str(demo[0] / "seed"), "--port", "0"])
    assert dense.exit_code == 2 and "not a composed one" in dense.output
