"""A torchrun worker for the multi-rank pretraining tests: train the `micro` model on a fixed synthetic corpus.

    torchrun --nproc-per-node N tests/multirank_pretrain.py OUT.json --tp T --pp P [--steps S]
        [--checkpoint-dir DIR --checkpoint-every K] [--stop-after K]

Every layout sees the same samples per step (recipes.pretrain_loop's global
batch order) and starts from the same weights (recipes.sharding), so the
per-step losses of any layout must equal the one-process run's. Rank 0
writes {"train": [[step, loss], ...], "val": [...], "logits": [...]} to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.megatron_model import init_parallel  # noqa: E402
from recipes.models import get_model_recipe  # noqa: E402
from recipes.pretrain import lr_at  # noqa: E402
from recipes.pretrain_loop import build_model_chunks, full_logits, make_optimizer, train  # noqa: E402
from recipes.stages import PretrainConfig  # noqa: E402

VOCAB, SEQ = 200, 32


class MarkovCorpus:
    """Sample i: a fixed-seed walk on a sparse random transition table (learnable, unlike uniform tokens)."""

    def __init__(self, n: int, seed: int):
        table = torch.randint(0, VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(0))  # 3 successors each
        g = torch.Generator().manual_seed(seed)
        rows = torch.empty(n, SEQ + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(SEQ):
            pick = torch.randint(0, 3, (n,), generator=g)
            rows[:, t + 1] = table[rows[:, t], pick]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(SEQ)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default="")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--stop-after", type=int, default=0, help="train only to this step (a simulated kill)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipe = get_model_recipe("micro", num_layers=4, parallelism={"tensor": args.tp, "pipeline": args.pp,
                                                                  "virtual_pipeline": args.vpp})
    world = init_parallel(recipe.parallelism, seed=7)
    accum = args.global_batch // (args.micro_batch * world.data_parallel_size)
    cfg = PretrainConfig(model="micro", max_steps=args.stop_after or args.steps, eval_every=5,
                         checkpoint_every=args.checkpoint_every, micro_batch_size=args.micro_batch,
                         grad_accum_steps=accum, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_batches=2,
                         keep_checkpoints=2, tensorboard=False)
    cfg_schedule = PretrainConfig(**{**cfg.__dict__, "max_steps": args.steps})  # the lr schedule of the whole run
    chunks = build_model_chunks(recipe, VOCAB, seed=7, seq_length=SEQ)
    optimizer = make_optimizer(chunks, cfg)
    train_ds, valid = MarkovCorpus(args.steps * args.global_batch, seed=1), MarkovCorpus(8, seed=2)
    valid_batches = [{k: torch.stack([valid[i][k] for i in range(j, j + args.micro_batch)]) for k in valid[0]}
                     for j in range(0, 8, args.micro_batch)]  # the same 8 samples on every layout
    root = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out).with_suffix(".ckpt")
    state = train(chunks, optimizer, train_ds, valid_batches, cfg, SEQ, world,
                  lambda step, _: lr_at(step, cfg_schedule), root, {"tp": args.tp, "pp": args.pp}, None)
    logits = full_logits(chunks, valid_batches, recipe.padded_vocab_size(VOCAB))
    if world.is_main:
        Path(args.out).write_text(json.dumps({"train": state["train"], "val": state["val"],
                                              "grad_norm": state["grad_norm"],
                                              "resumed_from": state["resumed_from"],
                                              "logits": logits[0, :4, :VOCAB].tolist()}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
