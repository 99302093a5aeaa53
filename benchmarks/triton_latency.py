"""Request latency and output tokens/s through Triton, against transformers generate() in the same run.

Measures, on the same checkpoint and the same prompts (greedy, so both produce
the same text):
  1. transformers `generate()` called sequentially in this process (the baseline);
  2. Triton (our repository, python backend) at concurrency 1 and 4 (HTTP, one
     client per thread; dynamic batching may group concurrent requests);
and the server's start-to-ready time. Prints p50/p95/p99 latency, output tokens/s
and the ratio to the baseline. Tokens are counted by re-tokenizing the answers.
Compare ratios, not absolute times: the machine is shared.

    python benchmarks/triton_latency.py                     # runs/tiny/export/triton_repo
    python benchmarks/triton_latency.py --hf path/to/hf     # export a temporary repository first
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from deploy.client import TextClient  # noqa: E402
from deploy.repository import write_repository  # noqa: E402
from deploy.server import TritonServer  # noqa: E402
from deploy.stages import ExportConfig  # noqa: E402

PROMPTS = [
    "The for statement",
    "A class definition",
    "Exceptions are raised when",
    "The import statement",
    "def f(x):\n    return",
    "Lists are mutable sequences",
    "The with statement is used to",
    "Python's dictionaries",
]


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0-100) of `values`, linearly interpolated."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(name: str, latencies_s: list[float], tokens: int, wall_s: float) -> dict:
    """Return the figures of one measured mode."""
    ms = [t * 1000 for t in latencies_s]
    return {
        "mode": name,
        "requests": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1),
    }


def load_transformers(hf_dir: Path, max_tokens: int, threads: int):
    """Return f(prompt) -> greedy continuation with transformers generate() in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def complete(prompt: str) -> str:
        enc = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return complete


def time_sequential(complete, prompts: list[str]) -> tuple[list[float], list[str], float]:
    """Return (latencies s, answers, wall s) of `complete` called on each prompt in turn."""
    latencies, answers = [], []
    started = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        answers.append(complete(prompt))
        latencies.append(time.perf_counter() - t0)
    return latencies, answers, time.perf_counter() - started


def time_triton(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list[float], list[str], float]:
    """Return (latencies s, answers, wall s) of `prompts` sent to Triton by `concurrency` threads."""

    def ask(prompt: str) -> tuple[float, str]:
        with TextClient(url, model) as client:
            t0 = time.perf_counter()
            answer = client.generate(prompt, max_tokens)
            return time.perf_counter() - t0, answer

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, prompts))
    return [t for t, _ in results], [a for _, a in results], time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="runs/tiny/export/triton_repo", help="exported Triton repository")
    parser.add_argument("--hf", help="HF checkpoint: export a temporary repository from it instead of --repo")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--requests", type=int, default=16, help="requests per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each measures every mode in turn")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client thread counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (baseline and server)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    tmp = None
    if args.hf:
        tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-"))
        repo = tmp / "triton_repo"
        write_repository(Path(args.hf), repo, ExportConfig(model_name=args.model, stream_model=False, torch_threads=args.threads))
    else:
        repo = Path(args.repo)
    hf_dir = repo / args.model / "1" / "hf"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    console = Console()
    baseline_name = "transformers, sequential"
    try:
        console.print(f"loading {hf_dir} in this process (baseline) ...")
        complete = load_transformers(hf_dir, args.max_tokens, args.threads)
        complete(prompts[0])  # warm-up
        tok = AutoTokenizer.from_pretrained(hf_dir)  # counts output tokens
        console.print(f"starting Triton on {repo} ...")
        with TritonServer(repo) as server:
            ready_s = server.start_to_ready_s
            with TextClient(server.http_url, args.model) as client:
                client.generate(prompts[0], args.max_tokens)  # warm-up
            modes = {baseline_name: lambda: time_sequential(complete, prompts)}
            for c in (int(c) for c in args.concurrency.split(",")):
                modes[f"Triton, {c} clients"] = lambda c=c: time_triton(server.http_url, args.model, prompts, args.max_tokens, c)
            measured = {name: {"latencies": [], "answers": [], "wall": 0.0} for name in modes}
            for _ in tqdm(range(args.rounds), desc="rounds (every mode in turn)"):
                for name, measure in modes.items():
                    latencies, answers, wall = measure()
                    measured[name]["latencies"] += latencies
                    measured[name]["answers"] += answers
                    measured[name]["wall"] += wall
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    expected = measured[baseline_name]["answers"]
    rows = []
    for name, m in measured.items():
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in m["answers"])
        row = summarize(name, m["latencies"], tokens, m["wall"])
        row["same_text_as_baseline"] = m["answers"] == expected
        rows.append(row)
    baseline = rows[0]

    table = Table(title=f"Triton vs transformers — {args.rounds}×{args.requests} requests, max_tokens {args.max_tokens}, greedy")
    for column in ("mode", "p50 ms", "p95 ms", "p99 ms", "tokens/s", "× base", "same text"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in rows:
        row["ratio_to_baseline"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 3)
        table.add_row(
            row["mode"], f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}", f"{row['p99_ms']:.1f}",
            f"{row['tokens_per_s']:.1f}", f"{row['ratio_to_baseline']:.2f}", str(row["same_text_as_baseline"]),
        )
    console.print(table)
    console.print(f"Triton start -> ready: {ready_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"start_to_ready_s": round(ready_s, 2), "modes": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
