"""Checks an `aigc report` page in a real headless browser: Playwright driving Debian's Chromium.

Chromium comes from the OS (`apt-get install chromium`, done by .ci/install.sh); Playwright's own browser
download is never used. Tests that use this skip, saying why, only where /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, as .ci/install.sh does): "
                    "the report is checked in a real browser")


class ReportBrowser:
    """One headless Chromium for several report pages (`with ReportBrowser() as b: b.check(...)`)."""

    def __enter__(self) -> "ReportBrowser":
        require_chromium()
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        return self

    def __exit__(self, *exc) -> None:
        self.browser.close()
        self._playwright.stop()

    def check(self, url: str, states: dict[str, str], metric: tuple[str, str, object] | None = None,
              min_images: int = 0):
        """Load the report at `url` and check it; return the page (open) for more checks.

        Checked: no console error, no uncaught exception, no request but the page itself (any other is
        blocked and reported) and none failed; exactly the stages `states` (name -> state), in the graph and
        as sections; every <img> decoded (naturalWidth > 0), at least `min_images` of them; `metric`
        (stage, key, manifest value) shown as that value.
        """
        page = self.browser.new_page()
        problems: list[str] = []
        page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url[:200]}"))
        page.on("request", lambda req: problems.append(f"request: {req.url[:200]}")
                if req.url != url and not req.url.startswith("data:") else None)

        def only_the_page(route) -> None:
            if route.request.url == url:
                route.continue_()
            else:
                route.abort()

        page.route("**/*", only_the_page)
        response = page.goto(url, wait_until="load", timeout=60_000)
        assert response is None or response.ok, response and response.status  # file:// has no response
        page.wait_for_timeout(200)  # late console messages
        assert not problems, problems

        sections = page.eval_on_selector_all("section.stage", "els => els.map(e => [e.dataset.stage, e.dataset.state])")
        assert dict(sections) == states and len(sections) == len(states), sections
        assert [s for s, _ in sections] == list(states)
        nodes = page.eval_on_selector_all("svg.graph g.node", "els => els.map(e => e.dataset.stage)")
        assert sorted(nodes) == sorted(states), nodes
        rows = page.eval_on_selector_all("table.summary tr[data-stage]", "els => els.map(e => e.dataset.stage)")
        assert rows == list(states), rows

        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(images) >= min_images, images
        assert all(done and width > 0 for _, done, width in images), [i for i in images if not i[2]]

        if metric is not None:
            stage, key, value = metric
            shown = page.locator(f'section[data-stage="{stage}"] tr[data-metric="{key}"] td').inner_text()
            expected = value if isinstance(value, str) else json.dumps(value)
            assert shown == expected, (stage, key, shown, value)
            if isinstance(value, float):
                assert float(shown) == value
        return page


def manifest_metric(run_dir: Path, stage: str, key: str):
    """Return metric `key` of `stage`'s manifest in `run_dir`."""
    return json.loads((run_dir / stage / "manifest.json").read_text())["metrics"][key]
