"""Load on the OpenAI-compatible front: ≥1000 requests at concurrency 32, mixed, through the official client.

Starts `aigc serve --openai-port` (Triton + the front, default ServingLimits) in a
subprocess on an exported repository (default runs/tiny/export/triton_repo, else a
random model of the `tiny` shape), then sends --requests requests from --concurrency
closed-loop `openai.AsyncOpenAI` clients: the four kinds in turn (completions and chat
completions, each whole and streamed), greedy, --max-tokens new tokens. The baseline is
the same mix sent by one client (concurrency 1) in the same run.
Prints per kind and overall: requests, errors (must be 0), latency p50/p99 (whole
answer; first event of a stream), output tokens/s and the ratio to the baseline.
Output tokens are counted by the served tokenizer on the answers' text.

    python benchmarks/openai_load.py [--repo runs/tiny/export/triton_repo] [--requests 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from curation.bpe import CHAT_TEMPLATE  # noqa: E402
from deploy.repository import write_repository  # noqa: E402
from deploy.server import free_port  # noqa: E402
from deploy.stages import ExportConfig  # noqa: E402
from record import save  # noqa: E402
from triton_latency import PROMPTS, percentile, random_tiny_checkpoint  # noqa: E402

KINDS = ("completion", "completion stream", "chat", "chat stream")


class Served:
    """`aigc serve --openai-port` in a subprocess: the server a user runs."""

    def __init__(self, repo: Path):
        self.port = free_port()
        args = ["--repo", str(repo), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                "--metrics-port", str(free_port()), "--openai-port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from deploy.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))",
             *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout_s: float = 600) -> float:
        """Return seconds to ready; raise RuntimeError where the server exits first."""
        started, seen = time.monotonic(), []
        while True:
            line = self.lines.get(timeout=timeout_s)
            if line is None:
                raise RuntimeError("aigc serve exited before ready:\n" + "".join(seen))
            seen.append(line)
            if "ready in" in line:
                return time.monotonic() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


async def one_request(client, kind: str, prompt: str, max_tokens: int) -> tuple[str, float, float | None]:
    """Send one request of `kind`; return (answer text, seconds to the whole answer, seconds to the first event)."""
    started = time.perf_counter()
    first = None
    if kind.startswith("completion"):
        if kind.endswith("stream"):
            text = ""
            async for chunk in await client.completions.create(model="ensemble", prompt=prompt, max_tokens=max_tokens,
                                                               temperature=0, stream=True):
                first = first or time.perf_counter() - started
                text += chunk.choices[0].text
        else:
            answer = await client.completions.create(model="ensemble", prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0)
            text = answer.choices[0].text
    else:
        messages = [{"role": "user", "content": prompt}]
        if kind.endswith("stream"):
            text = ""
            async for chunk in await client.chat.completions.create(model="ensemble", messages=messages,
                                                                    max_tokens=max_tokens, temperature=0,
                                                                    stream=True):
                first = first or time.perf_counter() - started
                text += chunk.choices[0].delta.content or ""
        else:
            answer = await client.chat.completions.create(model="ensemble", messages=messages,
                                                          max_tokens=max_tokens, temperature=0)
            text = answer.choices[0].message.content
    return text, time.perf_counter() - started, first


async def load(base_url: str, requests: int, concurrency: int, max_tokens: int, desc: str) -> dict:
    """Return every request's (kind, prompt, text, seconds, first-event seconds) or its error, and the wall time."""
    import httpx
    import openai

    work = list(range(requests))
    results: list[tuple] = []
    errors: list[str] = []
    bar = tqdm(total=requests, desc=desc)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4), timeout=600)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=http)

    async def worker():
        while work:
            i = work.pop(0)
            kind, prompt = KINDS[i % len(KINDS)], PROMPTS[(i // len(KINDS)) % len(PROMPTS)]
            try:
                text, seconds, first = await one_request(client, kind, prompt, max_tokens)
                results.append((kind, prompt, text, seconds, first))
            except Exception as exc:  # every failure counts
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            bar.update()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    bar.close()
    await client.close()
    return {"results": results, "errors": errors, "wall": wall}


def figures(run: dict, tokenizer, kinds: tuple[str, ...]) -> dict:
    """Return requests, errors, output tokens/s and latency percentiles (ms) of the results of `kinds`."""
    rows = [r for r in run["results"] if r[0] in kinds]
    tokens = sum(len(tokenizer(r[2], add_special_tokens=False)["input_ids"]) for r in rows)
    whole = [r[3] * 1000 for r in rows]
    first = [r[4] * 1000 for r in rows if r[4] is not None]
    errors = [e for e in run["errors"] if e.split(":")[0] in kinds]
    return {
        "requests": len(rows) + len(errors), "errors": len(errors), "output_tokens": tokens,
        "tokens_per_s": round(tokens / run["wall"], 1),
        "p50_ms": round(percentile(whole, 50), 1) if whole else None,
        "p99_ms": round(percentile(whole, 99), 1) if whole else None,
        "first_p50_ms": round(percentile(first, 50), 1) if first else None,
        "first_p99_ms": round(percentile(first, 99), 1) if first else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="runs/tiny/export/triton_repo", help="exported Triton repository")
    parser.add_argument("--random-model", action="store_true", help="serve a random model of the tiny shape instead "
                        "(answers run to max_tokens; a trained model's often end at eos after a few tokens)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=64, help="sent by one client, the same mix")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", help="write the figures here instead of benchmarks/results/openai_load.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    console = Console(width=max(140, Console().width))
    tmp = Path(tempfile.mkdtemp(prefix="aigc-load-"))
    try:
        repo = Path(args.repo)
        if args.random_model or not repo.is_dir():
            repo = tmp / "triton_repo"
            console.print(f"exporting a random model of the tiny shape to {repo}")
            hf = random_tiny_checkpoint(tmp / "hf")
            tokenizer = AutoTokenizer.from_pretrained(hf)
            tokenizer.chat_template = CHAT_TEMPLATE  # the template our tokenize stage gives its tokenizers
            tokenizer.save_pretrained(hf)
            write_repository(hf, repo, ExportConfig())
        tokenizer = AutoTokenizer.from_pretrained(repo / "ensemble" / "1" / "hf")
        served = Served(repo)
        try:
            ready_s = served.wait_ready()
            base_url = f"http://127.0.0.1:{served.port}/v1"
            asyncio.run(load(base_url, 8, 4, args.max_tokens, "warm-up"))
            baseline = asyncio.run(load(base_url, args.baseline_requests, 1, args.max_tokens, "baseline, 1 client"))
            loaded = asyncio.run(load(base_url, args.requests, args.concurrency, args.max_tokens,
                                      f"{args.concurrency} clients"))
        finally:
            served.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    expected = {(r[0], r[1]): r[2] for r in baseline["results"]}
    same = all(expected.get((r[0], r[1]), r[2]) == r[2] for r in loaded["results"])
    base_all = figures(baseline, tokenizer, KINDS)
    table = Table(title=f"OpenAI front under load: {args.requests} requests, {args.concurrency} concurrent clients, "
                        f"greedy, max_tokens {args.max_tokens} (baseline: {args.baseline_requests} from 1 client)")
    for column in ("requests", "kind", "n", "errors", "tok/s", "× 1 client", "p50 ms", "p99 ms", "first p50 ms",
                   "first p99 ms"):
        table.add_column(column, justify="left" if column in ("requests", "kind") else "right")
    report = {"start_to_ready_s": round(ready_s, 1), "same_text_as_baseline": same, "args": vars(args)}
    for label, run in (("1 client", baseline), (f"{args.concurrency} clients", loaded)):
        for kinds, name in [((k,), k) for k in KINDS] + [(KINDS, "all")]:
            f = figures(run, tokenizer, kinds)
            base = figures(baseline, tokenizer, kinds)
            ratio = f["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else float("nan")
            report[f"{label} / {name}"] = {**f, "ratio_to_one_client": round(ratio, 2)}
            table.add_row(label, name, str(f["requests"]), str(f["errors"]), f"{f['tokens_per_s']:.0f}",
                          f"{ratio:.2f}", *(("-" if f[k] is None else f"{f[k]:.1f}")
                                            for k in ("p50_ms", "p99_ms", "first_p50_ms", "first_p99_ms")))
    console.print(table)
    console.print(f"errors under load: {len(loaded['errors'])}" + (f" (first: {loaded['errors'][0]})"
                                                                  if loaded["errors"] else ""))
    console.print(f"answers equal to the one-client run's: {same}; server start to ready: {ready_s:.1f} s; "
                  f"wall {loaded['wall']:.1f} s vs {base_all['requests']} requests in {baseline['wall']:.1f} s")
    save("openai_load", report, args.json)
    return 1 if loaded["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
