"""Training throughput of the pretrain model: megatron-core GPTModel against HF LlamaForCausalLM.

CPU (default): for each sequence length, training steps of the same shape,
batch and weights (fp32, random tokens, fused AdamW for both): megatron-core
with our layer spec (local spec, SDPA core attention) as the pretrain stage
builds it, and transformers' LlamaForCausalLM (SDPA); with --local-spec also
megatron's unmodified local spec (explicit-softmax attention). Steps of the
models are interleaved, and each is timed by its fastest step, so that load
from other processes distorts the comparison as little as it can. Then
step time against model width (ours alone), and one AdamW step over the
model's parameters with torch's three implementations (the fused-optimizer
lever). MFU is achieved FLOP/s ((6·N + attention) FLOPs per token) over the
fp32 matmul peak measured with torch.mm in the same run (best of a measure
before and after). Absolute numbers depend on the machine and its load:
compare the ratios.

GPU (--device cuda): the pretrain stage's GPU path (megatron-core DDP, the
distributed optimizer, `get_forward_backward_func`, bf16 autocast over fp32
weights) against an HF LlamaForCausalLM loop (bf16 autocast, fused AdamW),
MFU against the GPU's dense bf16 peak (--peak-tflops, H100 SXM: 989) and the
bf16 torch.mm peak measured in the run.

    python benchmarks/pretrain_throughput.py [--model small] [--seqs 256,512,1024] [--widths 256,512,768]
    python benchmarks/pretrain_throughput.py --device cuda --seqs 1024 --batch 16 --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed", category=UserWarning)
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from recipes import megatron_model  # noqa: E402
from recipes.hf_export import llama_config, megatron_tensors, megatron_to_hf  # noqa: E402
from recipes.models import ModelRecipe, get_model_recipe  # noqa: E402
from recipes.pretrain_data import causal_mask  # noqa: E402
from record import save  # noqa: E402

OURS, LOCAL, HF = "megatron (our spec, SDPA)", "megatron local spec", "HF LlamaForCausalLM"
console = Console(width=150)


def matmul_peak_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, sizes=(1024, 2048), repeats=5) -> float:
    """Return the best torch.mm rate seen (GFLOP/s) over square sizes `sizes` on `device` in `dtype`."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def megatron_loss(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean next-token loss of a megatron GPTModel on `tokens` [b, s+1]."""
    return model(tokens[:, :-1], None, mask, labels=tokens[:, 1:]).mean()


def hf_loss(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean next-token loss of an HF causal LM on `tokens` [b, s+1]."""
    logits = model(input_ids=tokens[:, :-1]).logits  # [b, s, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def build_models(recipe: ModelRecipe, vocab_size: int, seq: int, local_spec: bool) -> dict[str, torch.nn.Module]:
    """Return the models to compare with the same weights: ours, HF Llama (and megatron's local spec)."""
    ours = megatron_model.build_gpt_model(recipe, vocab_size, seed=0, seq_length=seq)
    hf = LlamaForCausalLM(llama_config(recipe, vocab_size, seq))
    hf.load_state_dict(megatron_to_hf(megatron_tensors(ours), recipe, vocab_size), strict=True)
    models = {OURS: ours, HF: hf.to(next(ours.parameters()).device)}
    if local_spec:
        unfused = GPTModel(
            config=megatron_model.transformer_config(recipe, "cpu"),
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=recipe.padded_vocab_size(vocab_size),
            max_sequence_length=seq,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(recipe.rotary_base),
        )
        unfused.load_state_dict(ours.state_dict())
        models[LOCAL] = unfused
    return models


def time_cpu_steps(models: dict, batches: list[torch.Tensor], mask: torch.Tensor, warmup: int) -> dict[str, dict]:
    """Return per model: the fastest forward+backward and optimizer step seen (seconds), and the first loss.

    Steps of the models are interleaved; the first `warmup` steps are not
    timed. The fastest step is the one least disturbed by other processes: on
    a shared machine, medians of a few steps swing by 2x with the load.
    """
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
    times = {name: {"fwd_bwd": [], "optimizer": [], "first_loss": None} for name in models}
    for i, tokens in enumerate(batches):
        for name, model in models.items():
            loss_fn = hf_loss if name == HF else megatron_loss
            t0 = time.perf_counter()
            loss = loss_fn(model, tokens, mask)
            loss.backward()
            t1 = time.perf_counter()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if i >= warmup:
                times[name]["fwd_bwd"].append(t1 - t0)
                times[name]["optimizer"].append(t2 - t1)
            if times[name]["first_loss"] is None:
                times[name]["first_loss"] = loss.item()
    return {
        name: {"fwd_bwd": min(t["fwd_bwd"]), "optimizer": min(t["optimizer"]), "first_loss": t["first_loss"]}
        for name, t in times.items()
    }  # fmt: skip


def adamw_step_seconds(num_params: int) -> dict[str, float]:
    """Return the fastest of three AdamW steps over `num_params` fp32 parameters (seconds), per torch implementation."""
    params = [torch.nn.Parameter(torch.randn(num_params // 64)) for _ in range(64)]  # 64 tensors, num_params in all
    for p in params:
        p.grad = torch.randn_like(p)
    seconds = {}
    for name, kwargs in (("for-loop (CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):  # fmt: skip
        optimizer = torch.optim.AdamW(params, lr=1e-4, **kwargs)
        optimizer.step()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            optimizer.step()
            runs.append(time.perf_counter() - t0)
        seconds[name] = min(runs)
    return seconds


def cpu_benchmark(args) -> None:
    """Print the CPU tables, each when measured: ours vs HF per sequence length, width sweep, AdamW."""
    torch.set_num_threads(args.threads)
    recipe = get_model_recipe(args.model)
    vocab = recipe.padded_vocab_size(args.vocab_size)
    peak = matmul_peak_gflops()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in args.seqs:
        batch = max(1, args.tokens_per_step // seq)
        models = build_models(recipe, args.vocab_size, seq, args.local_spec)
        batches = [torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen) for _ in range(args.steps + 1)]
        rows.append((seq, batch, time_cpu_steps(models, batches, causal_mask(seq), warmup=1)))
        del models
    peak = max(peak, matmul_peak_gflops())  # the better of before and after: load varies

    table = Table(title=f"{args.model}: training step on CPU, {args.threads} thread(s), {datetime.date.today()}")
    for col in ("seq", "batch", "loop", "first loss", "fwd+bwd s", "AdamW s", "tokens/s", "MFU", "vs HF"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    for seq, batch, timed in rows:
        flops = recipe.flops_per_token(vocab, seq)
        step = {name: t["fwd_bwd"] + t["optimizer"] for name, t in timed.items()}
        for name, t in timed.items():
            rate = batch * seq / step[name]
            table.add_row(
                str(seq), str(batch), name, f"{t['first_loss']:.5f}", f"{t['fwd_bwd']:.3f}", f"{t['optimizer']:.3f}",
                f"{rate:,.0f}", f"{rate * flops / (peak * 1e9):.1%}", f"{step[HF] / step[name]:.2f}x",
            )  # fmt: skip
        table.add_section()
    console.print(table)
    figures = {"model": args.model, "params": recipe.num_params(vocab), "threads": args.threads,
               "peak_gflops": round(peak, 1), "steps": args.steps, "rows": [], "widths": []}
    for seq, batch, timed in rows:
        step = {name: t["fwd_bwd"] + t["optimizer"] for name, t in timed.items()}
        loops = {name: {"tokens_per_s": round(batch * seq / step[name], 1),
                        "mfu": round(batch * seq / step[name] * recipe.flops_per_token(vocab, seq) / (peak * 1e9), 4),
                        "vs_hf": round(step[HF] / step[name], 3)} for name in timed}
        figures["rows"].append({"seq": seq, "batch": batch, "loops": loops})
    console.print(
        f"fp32 matmul peak (torch.mm, n=1024/2048): {peak:.1f} GFLOP/s; {args.model}: "
        f"{recipe.num_params(vocab):,} params (vocab {vocab}); FLOPs per token 6·N (N less the input embedding) "
        "+ 12·L·s·h"
    )

    widths = Table(title=f"ours: step time against width (seq {args.width_seq}, ffn = 3 x hidden)")
    for col in ("hidden", "params", "batch", "step s", "tokens/s", "MFU"):
        widths.add_column(col, justify="right")
    for width in args.widths:
        wide = dataclasses.replace(recipe, hidden_size=width, ffn_hidden_size=3 * width)
        model = {OURS: megatron_model.build_gpt_model(wide, args.vocab_size, seed=0, seq_length=args.width_seq)}
        batch = max(1, args.tokens_per_step // args.width_seq)
        batches = [torch.randint(0, args.vocab_size, (batch, args.width_seq + 1), generator=gen) for _ in range(3)]
        t = time_cpu_steps(model, batches, causal_mask(args.width_seq), warmup=1)[OURS]
        step = t["fwd_bwd"] + t["optimizer"]
        rate = batch * args.width_seq / step
        mfu = rate * wide.flops_per_token(vocab, args.width_seq) / (peak * 1e9)
        widths.add_row(str(width), f"{wide.num_params(vocab) / 1e6:.1f}M", str(batch), f"{step:.3f}",
                       f"{rate:,.0f}", f"{mfu:.1%}")  # fmt: skip
        figures["widths"].append({"hidden": width, "params": wide.num_params(vocab), "batch": batch,
                                  "step_s": round(step, 3), "tokens_per_s": round(rate, 1), "mfu": round(mfu, 4)})
    console.print(widths)

    adamw = adamw_step_seconds(recipe.num_params(vocab))
    console.print(
        f"AdamW step over {recipe.num_params(vocab) / 1e6:.1f}M params: "
        + ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in adamw.items())
    )
    save("pretrain_throughput", {**figures, "adamw_ms": {name: round(s * 1e3, 1) for name, s in adamw.items()}})


def gpu_benchmark(args) -> None:
    """Print the GPU table: the stage's megatron-core DDP path vs an HF loop, bf16 autocast, MFU."""
    from recipes import pretrain_loop
    from recipes.stages import PretrainConfig

    recipe = get_model_recipe(args.model)
    vocab = recipe.padded_vocab_size(args.vocab_size)
    seq, batch = args.seqs[0], args.batch
    peak_measured = matmul_peak_gflops("cuda", torch.bfloat16, sizes=(4096, 8192), repeats=10) / 1e3  # TFLOP/s
    cfg = PretrainConfig(model=args.model, micro_batch_size=batch, lr=1e-4, min_lr=1e-4, warmup_steps=0)
    chunks = pretrain_loop.build_model_chunks(recipe, args.vocab_size, 0, seq, bf16=True)
    optimizer = pretrain_loop.make_optimizer(chunks, cfg)
    hf = LlamaForCausalLM(llama_config(recipe, args.vocab_size, seq)).cuda()
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def ours_step():
        tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), device="cuda", generator=gen)
        data = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq, device="cuda")}
        return pretrain_loop.train_step(chunks, optimizer, [data], seq, lr=1e-4)[0]

    def hf_step():
        tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = hf_loss(hf, tokens, None)
        loss.backward()
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    results = {}
    for name, step in ((OURS + ", DDP + distributed optimizer", ours_step), (HF, hf_step)):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        torch.cuda.synchronize()
        results[name] = ((time.perf_counter() - t0) / args.steps, losses[0], losses[-1])
    flops = recipe.flops_per_token(vocab, seq)
    hf_rate = batch * seq / results[HF][0]
    table = Table(
        title=f"{args.model} on {torch.cuda.get_device_name()}: batch {batch}×{seq}, bf16 autocast, "
        f"{args.steps} steps, {datetime.date.today()}"
    )
    columns = ("loop", "loss first→last", "step ms", "tokens/s", f"MFU vs {args.peak_tflops:.0f}", "MFU vs mm", "vs HF")
    for col in columns:
        table.add_column(col, justify="left" if col == "loop" else "right")
    for name, (seconds, first, last) in results.items():
        rate = batch * seq / seconds
        table.add_row(
            name, f"{first:.3f}→{last:.3f}", f"{seconds * 1e3:.1f}", f"{rate:,.0f}",
            f"{rate * flops / (args.peak_tflops * 1e12):.1%}", f"{rate * flops / (peak_measured * 1e12):.1%}",
            f"{rate / hf_rate:.2f}x",
        )  # fmt: skip
    console.print(table)
    save("pretrain_throughput_gpu", {
        "model": args.model, "device": torch.cuda.get_device_name(), "batch": batch, "seq": seq, "steps": args.steps,
        "peak_tflops_measured": round(peak_measured, 1), "peak_tflops_datasheet": args.peak_tflops,
        "loops": {name: {"step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(batch * seq / seconds, 1),
                         "mfu_datasheet": round(batch * seq / seconds * flops / (args.peak_tflops * 1e12), 4),
                         "mfu_measured": round(batch * seq / seconds * flops / (peak_measured * 1e12), 4),
                         "vs_hf": round(batch * seq / seconds / hf_rate, 3)}
                  for name, (seconds, first, last) in results.items()}})
    console.print(
        f"bf16 torch.mm peak measured (n=4096/8192): {peak_measured:.0f} TFLOP/s; datasheet dense bf16 "
        f"{args.peak_tflops:.0f}; {recipe.num_params(vocab):,} params, {flops / 1e6:.1f} MFLOP per token"
    )


def main() -> None:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="small")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seqs", type=ints, default=[256, 512, 1024])
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="CPU: batch = this / seq")
    parser.add_argument("--widths", type=ints, default=[256, 512, 768], help="CPU: hidden sizes of the width sweep")
    parser.add_argument("--width-seq", type=int, default=512)
    parser.add_argument("--local-spec", action="store_true", help="CPU: also time megatron's unmodified local spec")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="GPU: sequences per step")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU: datasheet dense bf16 peak")
    args = parser.parse_args()
    (gpu_benchmark if args.device == "cuda" else cpu_benchmark)(args)


if __name__ == "__main__":
    main()
