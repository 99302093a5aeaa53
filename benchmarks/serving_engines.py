"""Serving engines compared in one run: vLLM vs our decoder (pytorch, onnx) behind Triton, vs sequential generate().

On one checkpoint and one prompt set (greedy, so every engine must produce the baseline's
text), each engine is exported to its own Triton repository (export.backend = pytorch, onnx,
vllm) and served by the bundled tritonserver, one engine at a time; closed-loop streaming
clients (gRPC, `<model>_stream`, one thread each) at each concurrency measure output tokens/s
and first-token latency (p50/p99). The baseline is transformers `generate()` called
sequentially in this process. Output tokens are the baseline's exact counts (texts are checked
equal). The machine is shared: compare the ratios of one run, not absolute figures.

    python benchmarks/serving_engines.py --random-model    # the README's figures
    python benchmarks/serving_engines.py --hf runs/tiny/export/hf --engines pytorch,vllm

--random-model serves a randomly initialised Llama of the `tiny` recipe's shape (4 layers,
hidden 192, 6 heads of 32, 2 KV heads, context 256, 4k BPE vocabulary; ~4.6M parameters) whose
answers run to max_tokens (a trained tiny model often ends at eos after a few tokens).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from deploy.repository import write_repository  # noqa: E402
from deploy.server import TritonServer  # noqa: E402
from deploy.stages import ExportConfig  # noqa: E402
from deploy.vllm_env import vllm_missing  # noqa: E402
from record import save  # noqa: E402
from triton_latency import PROMPTS, closed_loop, measure_transformers, random_tiny_checkpoint, spread  # noqa: E402


def figures(run: dict, tokens: int, same: bool | None) -> dict:
    """Return tokens/s and first-token/full-response latency spreads of one closed-loop run."""
    return {"requests": len(run["full"]), "errors": len(run.get("errors", [])), "output_tokens": tokens,
            "tokens_per_s": round(tokens / run["wall"], 1), "first_token": spread(run["first"]),
            "full_response": spread(run["full"]), "same_text_as_baseline": same}


def measure_engine(engine: str, hf: Path, tmp: Path, baseline: dict, args) -> dict:
    """Export `hf` with backend `engine`, serve it, and return {"start_to_ready_s", "by_clients": {c: figures}}."""
    repo = tmp / f"repo_{engine}"
    write_repository(hf, repo, ExportConfig(backend=engine, max_batch_size=args.max_batch_size,
                                            torch_threads=args.threads))
    results = {}
    with TritonServer(repo, ready_timeout_s=args.ready_timeout) as server:
        closed_loop(server, "ensemble", PROMPTS[:2], args.max_tokens, 2, stream=True)  # warm-up
        for c in tqdm(args.clients, desc=f"{engine}, by concurrent clients"):
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(max(args.requests, 2 * c))]
            run = closed_loop(server, "ensemble", prompts, args.max_tokens, c, stream=True)
            tokens = sum(baseline["tokens"][p] for p, _ in run["answers"])
            same = all(text == baseline["answers"][p] for p, text in run["answers"])
            results[str(c)] = figures(run, tokens, same)
        ready = server.start_to_ready_s
    return {"start_to_ready_s": round(ready, 2), "by_clients": results}


def print_report(console: Console, doc: dict) -> None:
    """Print one table: engine x clients with tokens/s, ratio to the baseline, first-token p50/p99."""
    table = Table(title=f"serving engines — greedy, max_tokens {doc['max_tokens']}, {doc['threads']} thread(s)")
    for column in ("engine", "clients", "tok/s", "× generate()", "first p50 ms", "first p99 ms", "same", "err"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    base = doc["baseline"]
    table.add_row("generate() sequential", "1", f"{base['tokens_per_s']:.0f}", "1.00",
                  f"{base['first_token']['p50_ms']:.1f}", f"{base['first_token']['p99_ms']:.1f}", "True", "0")
    for engine, result in doc["engines"].items():
        for c, f in result["by_clients"].items():
            first = f["first_token"]
            table.add_row(engine, c, f"{f['tokens_per_s']:.0f}", f"{f['tokens_per_s'] / base['tokens_per_s']:.2f}",
                          "-" if first["p50_ms"] is None else f"{first['p50_ms']:.1f}",
                          "-" if first["p99_ms"] is None else f"{first['p99_ms']:.1f}",
                          str(f["same_text_as_baseline"]), str(f["errors"]))
    console.print(table)
    console.print(f"fastest engine (tokens/s summed over all client counts): {doc['fastest']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", help="HF checkpoint to serve (default: --random-model)")
    parser.add_argument("--random-model", action="store_true", help="a random model of the tiny shape")
    parser.add_argument("--engines", default="pytorch,onnx,vllm", help="comma-separated export backends")
    parser.add_argument("--clients", default="1,4,16,32", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=32, help="baseline requests; c clients send max(requests, 2c)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (baseline and every engine)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for a server to load its models")
    parser.add_argument("--json", help="write the results here instead of benchmarks/results/serving_engines.json")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    engines = args.engines.split(",")
    if "vllm" in engines and vllm_missing():
        parser.error(f"engine vllm: {vllm_missing()}")

    console = Console(width=max(120, Console().width))
    tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-engines-"))
    try:
        hf = Path(args.hf) if args.hf and not args.random_model else random_tiny_checkpoint(tmp / "hf")
        base_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        baseline = measure_transformers(hf, base_prompts, args.max_tokens, args.threads)
        doc = {"model": "random tiny-shaped Llama" if not args.hf or args.random_model else str(hf),
               "max_tokens": args.max_tokens, "threads": args.threads, "clients": args.clients,
               "baseline": {"requests": len(base_prompts), "output_tokens": baseline["output_tokens"],
                            "tokens_per_s": round(baseline["output_tokens"] / baseline["wall"], 1),
                            "first_token": spread(baseline["first"]), "full_response": spread(baseline["full"])},
               "engines": {}}
        for engine in engines:
            console.print(f"engine {engine}: export and serve ...")
            doc["engines"][engine] = measure_engine(engine, hf, tmp, baseline, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc["fastest"] = max(doc["engines"], key=lambda e: sum(f["tokens_per_s"]
                                                           for f in doc["engines"][e]["by_clients"].values()))
    print_report(console, doc)
    save("serving_engines", {**doc, "args": {k: v for k, v in vars(args).items()}}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
