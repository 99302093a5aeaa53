"""`aigc serve` (Triton in the foreground) and `aigc query` (one prompt to a running server)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path

from deploy.openai_server import ServingLimits

EXAMPLE_PROMPT = "The for statement"
LIMIT_HELP = {
    "max_body_bytes": "request body size (default: %(default)s)",
    "max_prompts": "prompts in one /v1/completions request (default: %(default)s)",
    "max_prompt_tokens": "tokens of one prompt; 0: the model's context less one (default: %(default)s)",
    "max_concurrent": "requests answered at once; a stream holds its slot to its end (default: %(default)s)",
    "max_queued": "requests waiting for a slot; more get 429 at once (default: %(default)s)",
    "queue_timeout_s": "seconds a queued request waits for a slot, then 503 (default: %(default)s)",
    "drain_timeout_s": "on Ctrl-C/SIGTERM, seconds requests in flight get to finish while new ones get 503 "
                       "(default: %(default)s)",
}


def serve_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc serve`."""
    parser = argparse.ArgumentParser(
        prog="aigc serve",
        description="Serve an exported Triton model repository with the Triton server bundled in "
        "nvidia-pytriton, in the foreground, until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--run-dir", default="runs/tiny", help="run directory whose export stage has completed (default: %(default)s)")
    parser.add_argument("--repo", help="Triton model repository (default: <run-dir>/export/triton_repo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default: %(default)s)")
    parser.add_argument("--openai-port", type=int,
                        help="also serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions) on this "
                             "port, forwarding to Triton (default: off)")
    limits = parser.add_argument_group(
        "limits of the OpenAI front", "beyond them a request gets a JSON error naming the limit: 413 (body), "
        "400 (prompts, prompt tokens, max_tokens over the repository's max_tokens_limit), 429 (queue full, with "
        "Retry-After), 503 (no slot within the queue timeout; shutting down)")
    for field in dataclasses.fields(ServingLimits):
        limits.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            metavar="N" if field.type == "int" else "S", help=LIMIT_HELP[field.name])
    parser.add_argument("--log-file", help="where the server log goes (default: a temporary file, removed on stop)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load (default: %(default)s)")
    return parser


def serve_main(argv: list[str]) -> int:
    """Run `aigc serve`; return the exit code (0 after a clean stop)."""
    args = serve_parser().parse_args(argv)
    from deploy.repository import STREAM_SUFFIX
    from deploy.server import TritonServer, TritonStartError

    try:
        limits = ServingLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServingLimits)})
    except ValueError as exc:
        print(f"aigc serve: --{str(exc).replace('_', '-', 2)}", file=sys.stderr)
        return 2
    repo = Path(args.repo) if args.repo else Path(args.run_dir) / "export" / "triton_repo"
    if not repo.is_dir():
        print(f"aigc serve: no Triton repository at {repo}: run the pipeline up to `export` first "
              f"(aigc run), or pass --repo", file=sys.stderr)
        return 2
    try:
        server = TritonServer(
            repo,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            log_file=Path(args.log_file) if args.log_file else None,
            ready_timeout_s=args.ready_timeout,
        )
    except FileNotFoundError as exc:  # a directory that holds no model (no */config.pbtxt)
        print(f"aigc serve: {exc}: pass --repo RUN_DIR/export/triton_repo of a completed export", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    front = None
    try:
        print(f"aigc serve: loading {', '.join(server.models)} from {server.repo} ...", flush=True)
        try:
            seconds = server.start()
        except TritonStartError as exc:
            print(f"aigc serve: {exc}", file=sys.stderr)
            return 1
        if stop.is_set():  # Ctrl-C while loading
            return 0
        model = next((m for m in server.models if not m.endswith(STREAM_SUFFIX)), server.models[0])
        openai_line = ""
        if args.openai_port is not None:
            from deploy.openai_server import OpenAIServer, create_app

            front = OpenAIServer(create_app(server.http_url, server.repo, model, limits), args.host, args.openai_port)
            front.start()
            openai_line = f"  OpenAI   {front.base_url} (model {model})\n"
        print(
            f"aigc serve: ready in {seconds:.1f}s — models: {', '.join(server.models)}\n"
            f"  HTTP     http://{server.http_url}\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  metrics  {server.metrics_url}\n"
            f"{openai_line}"
            f"  try:     aigc query \"{EXAMPLE_PROMPT}\" --url {server.http_url} --model {model}\n"
            f"  Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.is_running():
                print(f"aigc serve: the server died.\n{server.log_tail()}", file=sys.stderr)
                return 1
        print("aigc serve: stopping ...", flush=True)
        return 0
    finally:
        if front is not None:
            left = front.stop()
            if left:
                print(f"aigc serve: {left} requests were still in flight after {front.gate.limits.drain_timeout_s:g} s "
                      "(--drain-timeout-s) and were cut off", file=sys.stderr)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def query_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc query`."""
    parser = argparse.ArgumentParser(
        prog="aigc query",
        description="Send one prompt to a Triton server (ours, or a TensorRT-LLM ensemble) and print "
        "the generated continuation. Greedy unless sampling options are given.",
    )
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--url", help="host:port of the server (default: localhost:8000 for http, localhost:8001 for grpc)")
    parser.add_argument("--model", default="ensemble", help="model name (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens at most (default: %(default)s)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    parser.add_argument("--seed", type=int, help="random seed of sampling (sent as random_seed)")
    parser.add_argument("--stop", action="append", help="end the answer before this string (repeatable; sent as stop_words)")
    parser.add_argument("--protocol", choices=("http", "grpc"), help="default: http, or grpc with --stream")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (gRPC, model <model>_stream)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (default: %(default)s)")
    return parser


def query_main(argv: list[str]) -> int:
    """Run `aigc query`; return 0 after printing the answer, 1 on a server or connection error (one line), 2 on a
    usage error."""
    parser = query_parser()
    args = parser.parse_args(argv)
    protocol = args.protocol or ("grpc" if args.stream else "http")
    if args.stream and protocol != "grpc":
        parser.error("--stream needs --protocol grpc (Triton's HTTP infer refuses decoupled models)")
    from tritonclient.utils import InferenceServerException

    from deploy.client import DEFAULT_PORTS, ServerError, TextClient

    url = args.url or f"localhost:{DEFAULT_PORTS[protocol]}"
    host, _, port = url.rpartition(":")
    if "://" in url or not host or not port.isdigit():  # tritonclient would fail with a traceback
        parser.error(f"--url {url!r}: expected HOST:PORT without a scheme, e.g. localhost:{DEFAULT_PORTS[protocol]}")
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                "stop": args.stop}
    try:
        with TextClient(url, args.model, protocol, timeout_s=args.timeout) as client:
            if args.stream:
                for piece in client.stream(args.prompt, args.max_tokens, **sampling):
                    print(piece, end="", flush=True)
                print()
            else:
                print(client.generate(args.prompt, args.max_tokens, **sampling))
    except ServerError as exc:
        print(f"aigc query: the server answered with an error: {exc}", file=sys.stderr)
        return 1
    except (InferenceServerException, OSError) as exc:
        print(f"aigc query: cannot reach Triton at {url} ({protocol}): {exc}", file=sys.stderr)
        return 1
    return 0
