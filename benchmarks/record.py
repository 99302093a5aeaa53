"""Where benchmark figures go: one committed results file per benchmark, and a process-tree memory sampler.

Every benchmark ends with `save(name, figures)`, which writes
`benchmarks/results/<name>.json`: the figures, the exact command that produced
them, when, and on what machine (CPUs, load average, torch). The README's
tables are rendered from these files by `benchmarks/readme_tables.py`, and a
test fails when a README figure differs from its file.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """Return this process's command line as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(RESULTS.parent.parent)
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in ["python", str(script), *sys.argv[1:]])


def commit() -> str:
    """Return the repository's commit, with "+changes" when tracked files (results aside) differ from it
    ("" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(RESULTS.parent.parent), *args], capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip()
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results").strip()
    return head + ("+changes" if head and changes else "")


def machine() -> dict:
    """Return the facts about this machine that qualify a figure: CPUs, memory, load average, torch, Python."""
    facts = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
             "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def save(name: str, figures: dict, path: str | Path | None = None) -> Path:
    """Write the figures with their command, date and machine to benchmarks/results/<name>.json (or `path`);
    return the path written."""
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command_line(), "commit": commit(),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": machine(), "figures": figures}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"results: {out}")
    return out


class PeakMemory:
    """Samples the summed RSS of a process and its descendants in a thread; `peak` is the maximum in bytes."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fmt(value) -> str:
    """Return a table cell: "–" for None, 4 significant digits for a float, str() otherwise."""
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
