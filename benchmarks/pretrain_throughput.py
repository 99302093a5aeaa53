"""Training throughput of the pretrain model on CPU: megatron-core GPTModel against HF LlamaForCausalLM.

Three training loops of the same shape, batch and weights (AdamW, fp32, random
tokens): megatron-core with our layer spec (local spec, SDPA core attention),
megatron-core's unmodified local spec (explicit-softmax attention), and
transformers' LlamaForCausalLM (SDPA). Steps of the three are interleaved so
that load from other processes hits all of them alike. MFU is achieved FLOP/s
((6·N + attention) FLOPs per token) over the fp32 matmul peak measured with
torch.mm in the same run. Absolute numbers depend on the machine and its load:
compare the ratios.

    python benchmarks/pretrain_throughput.py [--model tiny] [--threads 1] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
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
from recipes.models import get_model_recipe  # noqa: E402
from recipes.pretrain_data import causal_mask  # noqa: E402


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """Return the best fp32 torch.mm rate seen (GFLOP/s) over square sizes `sizes`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def megatron_step(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean loss of one forward/backward of a megatron GPTModel on `tokens` [b, s]."""
    loss = model(tokens[:, :-1], None, mask, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss


def hf_step(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean loss of one forward/backward of an HF causal LM on `tokens` [b, s]."""
    logits = model(input_ids=tokens[:, :-1]).logits  # [b, s-1, V]
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss


def build_models(model_name: str, vocab_size: int, seed: int) -> dict[str, torch.nn.Module]:
    """Return the three models with the same weights: ours, megatron's local spec, HF Llama."""
    recipe = get_model_recipe(model_name)
    ours = megatron_model.build_gpt_model(recipe, vocab_size, seed)
    hf_state = megatron_to_hf(megatron_tensors(ours), recipe, vocab_size)
    hf = LlamaForCausalLM(llama_config(recipe, vocab_size, recipe.seq_length))
    hf.load_state_dict(hf_state, strict=True)

    unfused = GPTModel(
        config=megatron_model.transformer_config(recipe, "cpu"),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=recipe.padded_vocab_size(vocab_size),
        max_sequence_length=recipe.seq_length,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(recipe.rotary_base),
    )
    unfused.load_state_dict(ours.state_dict())
    return {"megatron (our spec, SDPA)": ours, "megatron local spec": unfused, "HF LlamaForCausalLM": hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = get_model_recipe(args.model)
    seq = recipe.seq_length

    peak = matmul_peak_gflops()
    models = build_models(args.model, args.vocab_size, seed=0)
    steps = {name: megatron_step for name in models} | {"HF LlamaForCausalLM": hf_step}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (args.batch, seq + 1), generator=gen) for _ in range(args.steps + 2)]
    mask = causal_mask(seq)
    times: dict[str, list[float]] = {name: [] for name in models}
    first_loss = {}
    for i, tokens in enumerate(batches):
        for name, model in models.items():  # interleaved: the same load hits every model
            t0 = time.perf_counter()
            loss = steps[name](model, tokens, mask)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            first_loss.setdefault(name, loss.item())

    flops_per_token = recipe.flops_per_token(recipe.padded_vocab_size(args.vocab_size), seq)
    tokens_per_step = args.batch * seq
    hf_rate = tokens_per_step / statistics.median(times["HF LlamaForCausalLM"])
    table = Table(title=f"pretrain throughput: {args.model}, batch {args.batch}×{seq}, {args.threads} thread(s)")
    for col in ("loop", "first loss", "median step s", "tokens/s", "MFU", "vs HF"):
        table.add_column(col, justify="right" if col != "loop" else "left")
    for name in models:
        rate = tokens_per_step / statistics.median(times[name])
        table.add_row(
            name,
            f"{first_loss[name]:.5f}",
            f"{statistics.median(times[name]):.3f}",
            f"{rate:,.0f}",
            f"{rate * flops_per_token / (peak * 1e9):.1%}",
            f"{rate / hf_rate:.2f}x",
        )
    console = Console()
    console.print(table)
    console.print(
        f"fp32 matmul peak (torch.mm, n=1024/2048): {peak:.1f} GFLOP/s; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token (6·N, N = {recipe.num_params(args.vocab_size):,} "
        f"params less the input embedding, + attention)"
    )


if __name__ == "__main__":
    main()
