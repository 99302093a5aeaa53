"""`aigc report` on the toy a -> b -> c (+ a -> r) registry: every state a stage can be in, text escaped,
the page checked in a real browser (tests/report_browser.py); the server answers on 127.0.0.1 only.

The real chains' reports are checked where their runs already exist: tests/test_e2e.py (the smoke LLM chain)
and tests/test_multimodal.py (a partial and a finished NeRF run, a t2i run, `--serve`).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

import contract_stages
from pipeline import report
from pipeline import stage as registry
from pipeline.runner import configs_to_json, execute_stage, make_plan
from report_browser import ReportBrowser

MARKUP = '<img src=x onerror="alert(1)"></pre><script>alert(2)</script> & [red]x[/a:/b]'


@pytest.fixture
def toy(monkeypatch):
    """Install the toy registry; its stage a also records a metric holding markup, as corpus text may."""
    monkeypatch.setattr(registry, "_active", registry._active)
    contract_stages.install()
    run_a = contract_stages.run_a

    def run_a_with_markup(ctx):
        result = run_a(ctx)
        result.metrics["sample"] = MARKUP
        return result

    monkeypatch.setattr(contract_stages, "run_a", run_a_with_markup)  # same code file: same fingerprint
    return contract_stages


def test_report_shows_every_state_escapes_text_and_loads_nothing(toy, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = toy.configs()
    for name in ("a", "b", "c"):
        execute_stage(str(run_dir), name, configs_to_json(cfg))
    changed = toy.configs(c__suffix="?")  # c's settings changed since: its output is stale
    names = ["a", "b", "c", "r"]
    fps = {p.name: p.fingerprint for p in make_plan(run_dir, changed, names)}
    stale = report.write_report(run_dir, tmp_path / "stale.html", names, fps)

    def fail(ctx):
        raise RuntimeError(MARKUP)

    monkeypatch.setattr(toy, "run_c", fail)
    with pytest.raises(RuntimeError):
        execute_stage(str(run_dir), "c", configs_to_json(changed))
    failed = report.write_report(run_dir, tmp_path / "failed.html", names, fps, {"config": "toy", "chain": "llm"})
    text = failed.read_text()
    assert "<script>alert" not in text and "onerror=\"alert" not in text and "&lt;script&gt;" in text

    chars = json.loads((run_dir / "a" / "manifest.json").read_text())["metrics"]["chars"]
    with ReportBrowser() as browser:
        page = browser.check(stale.as_uri(), {"a": "completed", "b": "completed", "c": "stale", "r": "not run"},
                             ("a", "chars", chars))
        assert page.locator('section[data-stage="c"]').inner_text().count("Stale") == 1
        page = browser.check(failed.as_uri(), {"a": "completed", "b": "completed", "c": "failed", "r": "not run"},
                             ("a", "sample", MARKUP))
        assert page.evaluate("document.scripts.length") == 0 and page.evaluate("document.images.length") == 0
        assert page.locator('section[data-stage="c"] pre.error').inner_text() == f"RuntimeError: {MARKUP}"
        assert page.locator("svg.graph path.edge").count() == 3  # a -> b, b -> c, a -> r
        lineage = page.locator('section[data-stage="b"] table.inputs tr[data-input="a"]').inner_text()
        assert fps["a"] in lineage and "same as its output now" in lineage
        roles = page.eval_on_selector_all('section[data-stage="c"] table.outputs tr[data-role]',
                                          "els => els.map(e => e.dataset.role)")
        assert roles == ["dir"]  # the last good output of c, kept in place, still shown


def test_report_server_answers_the_page_on_loopback_only(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("<!DOCTYPE html><title>r</title>\n")
    server = report.make_server(page, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
            assert answer.read() == page.read_bytes()
            assert answer.headers["Content-Security-Policy"] == report.CSP
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/../../etc/passwd", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
