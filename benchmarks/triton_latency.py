"""Output tokens/s and latency through Triton, against transformers generate() in the same run.

Measures, on the same checkpoint and prompts (greedy, so every mode produces the same text):
  1. transformers `generate()` called sequentially in this process (the baseline);
  2. Triton (our repository, python backend) at each concurrency (default 1, 4, 16, 64):
     closed-loop tritonclient clients (one thread each), each sending its next request when
     its answer is complete: streaming over gRPC (`<model>_stream`, first token and full
     response) and whole answers over HTTP (`<model>`, full response);
  3. Triton's own cost: round trips to a trivial (identity) python model, and the
     start-to-ready time of both servers.
Prints p50/p95/p99 latency, output tokens/s, the ratio to the baseline, and the mean batch
the decoder ran (from the server's aigc_decode_* metrics). Output tokens are the baseline's
exact counts (the texts are checked equal). The machine is shared: compare ratios of one run.

    python benchmarks/triton_latency.py                      # runs/tiny/export/triton_repo, else a random tiny-shaped model
    python benchmarks/triton_latency.py --hf path/to/hf --backend onnx
    python benchmarks/triton_latency.py --random-model --backend onnx   # answers run to max_tokens

A trained model (the tiny chain's) often ends its answer with eos after a few tokens, so
its figures measure per-request overhead more than decoding; --random-model serves a
random model of the tiny shape, whose answers run to max_tokens.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from deploy.client import ServerError, TextClient  # noqa: E402
from deploy.repository import STREAM_SUFFIX, write_repository  # noqa: E402
from deploy.server import TritonServer  # noqa: E402
from record import save  # noqa: E402
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
IDENTITY_CONFIG = """backend: "python"
max_batch_size: 64
dynamic_batching { }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
IDENTITY_MODEL = """import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0-100) of `values`, linearly interpolated."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def spread(seconds: list[float]) -> dict:
    """Return p50/p95/p99 of latencies in ms (None where there are none)."""
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ms = [s * 1000 for s in seconds]
    return {f"p{q}_ms": round(percentile(ms, q), 2) for q in (50, 95, 99)}


def random_tiny_checkpoint(out: Path) -> Path:
    """Write a randomly initialised Llama of the `tiny` recipe's shape with a 4k byte-level BPE
    trained on pydoc text (throughput does not depend on trained weights)."""
    import pydoc_data.topics
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from recipes.models import tiny

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    shape = tiny()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups, max_position_embeddings=shape.seq_length,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# -- the baseline ---------------------------------------------------------------------------


def measure_transformers(hf_dir: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """Return the baseline's figures, with per-prompt answers and exact output token counts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def complete(prompt: str) -> tuple[str, int, float, float]:
        enc = tok(prompt, return_tensors="pt")
        streamer = FirstToken()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 streamer=streamer)
        full = time.perf_counter() - t0
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return tok.decode(new, skip_special_tokens=True), len(new), streamer.first - t0, full

    complete(prompts[0])  # warm-up
    first, full, answers, tokens = [], [], {}, {}
    started = time.perf_counter()
    for prompt in tqdm(prompts, desc="transformers generate(), sequential"):
        text, count, t_first, t_full = complete(prompt)
        first.append(t_first)
        full.append(t_full)
        answers[prompt], tokens[prompt] = text, count
    wall = time.perf_counter() - started
    return {"first": first, "full": full, "wall": wall, "answers": answers, "tokens": tokens,
            "output_tokens": sum(tokens[p] for p in prompts)}


# -- Triton ------------------------------------------------------------------------------------


def closed_loop(server: TritonServer, model: str, prompts: list[str], max_tokens: int, concurrency: int,
                stream: bool) -> dict:
    """Send `prompts` through `concurrency` tritonclient clients (threads) that each wait for an
    answer before their next request: streaming over gRPC (`<model>_stream`), whole answers over
    HTTP (`<model>`). Return latencies (first token where streaming, full response), answers, errors
    and the wall time."""
    work: queue.SimpleQueue = queue.SimpleQueue()
    for prompt in prompts:
        work.put(prompt)
    first, full, answers, errors = [], [], [], []

    def client_loop():
        url, protocol = (server.grpc_url, "grpc") if stream else (server.http_url, "http")
        with TextClient(url, model, protocol) as client:
            while True:
                try:
                    prompt = work.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    if stream:
                        pieces = client.stream(prompt, max_tokens)
                        text = next(pieces)
                        first.append(time.perf_counter() - t0)
                        text += "".join(pieces)
                    else:
                        text = client.generate(prompt, max_tokens)
                except (ServerError, ConnectionError) as exc:
                    errors.append(str(exc))
                    continue
                full.append(time.perf_counter() - t0)
                answers.append((prompt, text))

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"first": first, "full": full, "wall": time.perf_counter() - started, "answers": answers, "errors": errors}


def decode_counters(metrics_url: str, model: str) -> tuple[float, float]:
    """Return (decode steps, rows summed over steps) of `model` from the server's metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()

    def value(name: str) -> float:
        found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    return value("aigc_decode_steps_total"), value("aigc_decode_rows_total")


def measure_triton(server: TritonServer, model: str, prompts: list[str], max_tokens: int, concurrency: int,
                   stream: bool) -> dict:
    """Return the figures of one closed-loop run, with the decoder's mean batch size."""
    target = model + STREAM_SUFFIX if stream else model
    before = decode_counters(server.metrics_url, target)
    run = closed_loop(server, model, prompts, max_tokens, concurrency, stream)
    after = decode_counters(server.metrics_url, target)
    steps, rows = after[0] - before[0], after[1] - before[1]
    run["mean_batch"] = round(rows / steps, 1) if steps else None
    return run


def measure_identity(requests: int) -> dict:
    """Return Triton's start-to-ready time and round-trip latencies for a trivial identity model."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-identity-"))
    try:
        (tmp / "identity" / "1").mkdir(parents=True)
        (tmp / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
        (tmp / "identity" / "1" / "model.py").write_text(IDENTITY_MODEL)
        figures = {}
        with TritonServer(tmp) as server:
            figures["start_to_ready_s"] = round(server.start_to_ready_s, 2)
            for protocol, api, url in (("http", httpclient, server.http_url), ("grpc", grpcclient, server.grpc_url)):
                client = api.InferenceServerClient(url)
                x = api.InferInput("x", [1, 1], "FP32")
                x.set_data_from_numpy(np.ones((1, 1), dtype=np.float32))
                for _ in range(20):  # warm-up
                    client.infer("identity", [x])
                latencies = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    client.infer("identity", [x])
                    latencies.append(time.perf_counter() - t0)
                client.close()
                figures[protocol] = spread(latencies)
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------


def row(mode: str, run: dict, tokens: int, baseline_tps: float | None, same: bool | None) -> dict:
    """Return one table row of figures."""
    tps = tokens / run["wall"]
    figures = {"mode": mode, "requests": len(run["full"]), "errors": len(run.get("errors", [])),
               "output_tokens": tokens, "tokens_per_s": round(tps, 1),
               "ratio_to_baseline": round(tps / baseline_tps, 2) if baseline_tps else 1.0,
               "first_token": spread(run["first"]), "full_response": spread(run["full"]),
               "mean_batch": run.get("mean_batch"), "same_text_as_baseline": same}
    return figures


def print_report(console: Console, rows: list[dict], identity: dict, ready_s: float, title: str) -> None:
    table = Table(title=title)
    columns = ("mode", "tok/s", "× base", "first p50", "first p95", "first p99", "full p50", "full p95",
               "full p99", "batch", "same", "err")
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")

    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    for r in rows:
        table.add_row(
            r["mode"], f"{r['tokens_per_s']:.0f}", f"{r['ratio_to_baseline']:.2f}",
            ms(r["first_token"]["p50_ms"]), ms(r["first_token"]["p95_ms"]), ms(r["first_token"]["p99_ms"]),
            ms(r["full_response"]["p50_ms"]), ms(r["full_response"]["p95_ms"]), ms(r["full_response"]["p99_ms"]),
            "-" if r["mean_batch"] is None else str(r["mean_batch"]),
            "-" if r["same_text_as_baseline"] is None else str(r["same_text_as_baseline"]), str(r["errors"]),
        )
    console.print(table)
    console.print("latencies in ms; c = concurrent clients; stream: <model>_stream (continuous batching), whole: "
                  "<model> (Triton's dynamic batches); batch = mean rows per decode step on the server")
    console.print(f"Triton start -> ready, LLM repository: {ready_s:.1f} s; trivial identity model: "
                  f"{identity['start_to_ready_s']:.1f} s")
    console.print(f"Triton round trip, trivial identity model (p50 / p95 / p99 ms): "
                  f"HTTP {identity['http']['p50_ms']} / {identity['http']['p95_ms']} / {identity['http']['p99_ms']}, "
                  f"gRPC {identity['grpc']['p50_ms']} / {identity['grpc']['p95_ms']} / {identity['grpc']['p99_ms']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="runs/tiny/export/triton_repo", help="exported Triton repository")
    parser.add_argument("--hf", help="HF checkpoint: export a temporary repository from it instead of --repo")
    parser.add_argument("--random-model", action="store_true", help="a random model of the tiny shape instead of "
                        "--repo/--hf (answers run to max_tokens)")
    parser.add_argument("--backend", default="pytorch", choices=("pytorch", "onnx"), help="backend of the temporary "
                        "repository (with --hf, or the random tiny model)")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--requests", type=int, default=16, help="baseline requests; each concurrency c sends "
                        "max(requests, 4c)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--max-batch-size", type=int, default=64, help="of the temporary repository")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (baseline and server)")
    parser.add_argument("--identity-requests", type=int, default=300)
    parser.add_argument("--json", help="write the results here instead of benchmarks/results/triton_latency_<backend>.json")
    args = parser.parse_args(argv)

    console = Console(width=max(150, Console().width))
    tmp = Path(tempfile.mkdtemp(prefix="aigc-bench-"))
    try:
        if args.hf or args.random_model or not Path(args.repo).is_dir():
            hf = Path(args.hf) if args.hf and not args.random_model else random_tiny_checkpoint(tmp / "hf")
            repo = tmp / "triton_repo"
            console.print(f"exporting {hf} ({args.backend}) to {repo} ...")
            write_repository(hf, repo, ExportConfig(model_name=args.model, backend=args.backend,
                                                    max_batch_size=args.max_batch_size, torch_threads=args.threads))
            hf_dir = hf
        else:
            repo, hf_dir = Path(args.repo), Path(args.repo) / args.model / "1" / "hf"
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        base_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        baseline = measure_transformers(hf_dir, base_prompts, args.max_tokens, args.threads)
        base_tps = baseline["output_tokens"] / baseline["wall"]
        rows = [row("generate() sequential", baseline, baseline["output_tokens"], None, True)]
        console.print(f"starting Triton on {repo} ...")
        with TritonServer(repo) as server:
            ready_s = server.start_to_ready_s
            for stream in (True, False):  # warm-up of both models
                measure_triton(server, args.model, PROMPTS[:2], args.max_tokens, 2, stream)
            for c in tqdm(concurrencies, desc="Triton, by concurrency"):
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(max(args.requests, 4 * c))]
                for stream in (True, False):
                    run = measure_triton(server, args.model, prompts, args.max_tokens, c, stream)
                    tokens = sum(baseline["tokens"][p] for p, _ in run["answers"])
                    same = all(text == baseline["answers"][p] for p, text in run["answers"])
                    mode = f"Triton c={c} {'stream' if stream else 'whole'}"
                    rows.append(row(mode, run, tokens, base_tps, same))
        identity = measure_identity(args.identity_requests)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    title = (f"Triton ({args.backend if args.hf or args.random_model or not Path(args.repo).is_dir() else repo}) "
             "vs transformers — "
             f"greedy, max_tokens {args.max_tokens}, {args.threads} torch thread(s)")
    print_report(console, rows, identity, ready_s, title)
    save(f"triton_latency_{args.backend}", {"start_to_ready_s": round(ready_s, 2), "identity": identity,
                                            "modes": rows, "args": vars(args)}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
