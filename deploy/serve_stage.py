"""The `serve` stage: start Triton on the exported repository, answer one prompt, stop.

Output: `answer.json` (role `answer`: prompt, answer, start_to_ready_s,
latency_ms) and the server log `triton.log` (role `log`).
"""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deploy.client import TextClient
from deploy.server import TritonServer
from pipeline.stage import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    """Serve the exported repository, send the configured prompt; return roles answer, log."""
    cfg = ctx.config
    repo = ctx.input_path("export", "triton_repo")
    model = ctx.input_metrics("export")["model_name"]
    print(f"[aigc] serve: starting Triton on {cfg.host} with {repo}", flush=True)
    log = ctx.out_dir / "triton.log"
    log.unlink(missing_ok=True)
    with TritonServer(repo, host=cfg.host, log_file=log, ready_timeout_s=cfg.ready_timeout_s) as server:
        print(f"[aigc] serve: ready in {server.start_to_ready_s:.1f}s at http://{server.http_url}", flush=True)
        with TextClient(server.http_url, model) as client:
            started = time.perf_counter()
            answer = client.generate(cfg.prompt, cfg.max_tokens)
            latency_ms = (time.perf_counter() - started) * 1000

    record = {
        "prompt": cfg.prompt,
        "answer": answer,
        "max_tokens": cfg.max_tokens,
        "model": model,
        "start_to_ready_s": round(server.start_to_ready_s, 3),
        "latency_ms": round(latency_ms, 2),
    }
    (ctx.out_dir / "answer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    console = Console()
    console.print(Panel(Text.assemble((cfg.prompt, "bold"), (answer, "green")), title=f"Triton answer ({model})"))
    table = Table(title="serve")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("start -> ready (s)", f"{record['start_to_ready_s']:.2f}")
    table.add_row("request latency (ms)", f"{record['latency_ms']:.1f}")
    table.add_row("answer characters", str(len(answer)))
    console.print(table)
    return StageResult(outputs={"answer": "answer.json", "log": "triton.log"}, metrics=record)
