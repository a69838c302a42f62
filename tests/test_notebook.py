"""The notebook view: `RoutingReport` shows the self-contained report inline, and examples/notebook.ipynb runs end to
end offline (executed by nbclient, as Jupyter would)."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import moekit

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"


def test_routing_report_shows_itself_inline_without_network(demo):
    root, _, _ = demo
    model = moekit.load(root / "btx+routers", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(root / "btx+routers")
    trace = moekit.capture_routing(model, tokenizer, ["def f(x):\n    return x", "The cat sat."], ["code", "prose"])
    report = moekit.RoutingReport(trace, title="inline <test>")
    shown = report._repr_html_()
    assert shown.startswith("<iframe") and 'sandbox="allow-scripts"' in shown and "inline &lt;test&gt;" in shown
    page = html.unescape(shown.split('srcdoc="', 1)[1].rsplit('"></iframe>', 1)[0])
    assert page == report.html() == moekit.views.render_report(trace, title="inline <test>")
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing fetched
    assert report.save(Path(root) / "inline.html").read_text() == page


@pytest.mark.slow
def test_the_example_notebook_runs_offline(demo, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    root, _, _ = demo
    cached = tmp_path / "demo"  # the demo fixture's trained experts, reused through the demo's own cache
    cached.mkdir()
    for name in ("seed", "experts", "demo-experts.json"):
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, cached / name)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["MOEKIT_DEMO_DIR"] = str(cached)
    try:
        NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["MOEKIT_DEMO_DIR"]
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any(s.startswith("<iframe") and "btx over code, prose and arithmetic" in s for s in shown)
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "trained" in printed and "mixtral" in printed and "model.safetensors" in printed
    assert "experts (3, top-2)" in printed or "top-2" in printed  # the plan summary
