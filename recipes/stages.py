"""Stage registrations and configs of the recipes package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class PretrainConfig:
    """Settings of the `pretrain` stage; `model` names a recipe in recipes.models.

    Architecture and parallelism fields left at 0 take the recipe's value.
    """

    model: str = "tiny"
    max_steps: int = 250
    eval_every: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 2  # newest sharded checkpoints kept under checkpoint/
    micro_batch_size: int = 0  # sequences per forward pass per data-parallel rank; 0 = the model recipe's
    grad_accum_steps: int = 1  # micro-batches per optimizer step (derived when there is a global batch)
    global_batch_size: int = 0  # sequences per optimizer step; 0 = the recipe's, else micro x accumulation x DP
    seq_length: int = 0  # 0 = the model recipe's
    num_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    num_query_groups: int = 0
    ffn_hidden_size: int = 0
    rotary_base: float = 0.0
    tensor_parallel: int = 0  # world = TP * PP * CP * DP ranks (--nproc-per-node, or the Slurm job's)
    pipeline_parallel: int = 0
    virtual_pipeline_parallel: int = 0  # interleaved 1F1B: model chunks per pipeline rank
    context_parallel: int = 0  # needs Transformer Engine (GPU)
    data_prefixes: tuple[str, ...] = ()  # indexed datasets to blend; () = the tokenize train split
    data_weights: tuple[float, ...] = ()  # one relative weight per data prefix
    bf16: bool = True  # bf16 autocast where the device has it (CUDA); CPU always trains in fp32
    tensorboard: bool = True  # scalars under tensorboard/
    lr: float = 2e-3
    min_lr: float = 2e-4  # end of the cosine decay
    warmup_steps: int = 20  # linear warmup (capped at max_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_batches: int = 8  # validation micro-batches per evaluation (fewer if the set is smaller)


@dataclasses.dataclass
class SFTConfig:
    """Settings of the `sft` stage: LoRA (merged back into the base weights) or full fine-tuning.

    `recipe` names a set of defaults in recipes.sft_recipes (tiny, llama3_8b_lora,
    llama3_8b_full); every field left at None takes the recipe's value, a field
    that is set (by a preset or `sft.x=` on the command line) keeps its own.
    """

    recipe: str = "tiny"
    mode: str | None = None  # lora | full
    # data
    data_files: tuple[str, ...] = ()  # JSONL of {"messages"} or {"instruction","input","output"}; () = from the corpus
    max_rejects_fraction: float = 0.1  # malformed records / records read above this fail the stage
    max_examples: int = 0  # training examples used; 0 = all
    eval_examples: int = 32  # held-out examples scored before, during and after
    heldout_fraction: float = 0.1  # share of data_files records without a split held out (corpus: tokenize's split)
    max_length: int | None = None  # tokens per chat, and per packed row (capped by the model's positions)
    packing: bool | None = None  # pack several chats per row (attention stays within each chat)
    # optimisation
    max_steps: int | None = None
    batch_size: int | None = None  # rows per micro-batch (chats, or packed rows with packing)
    grad_accum_steps: int | None = None  # micro-batches per optimizer step
    learning_rate: float | None = None
    warmup_steps: int | None = None
    eval_every: int | None = None  # steps between held-out losses on the loss curve; 0 = start and end only
    bf16: bool | None = None  # on CUDA: bf16 autocast (and a bf16 frozen base with LoRA); CPU trains in fp32
    gradient_checkpointing: bool | None = None
    checkpoint_every: int = 25  # steps between resumable checkpoints (and at the last step); 0 = none
    keep_checkpoints: int = 2  # newest kept under checkpoints/ while training (deleted once hf/ is saved)
    # LoRA / DoRA
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: tuple[str, ...] | None = None
    use_dora: bool | None = None  # weight-decomposed LoRA (peft's DoRA)


@dataclasses.dataclass
class EvaluateConfig:
    """Settings of the `evaluate` stage."""

    max_batches: int = 20  # held-out batches scored per model; 0 = all
    max_new_tokens: int = 32
    batch_size: int = 8
    max_length: int = 256  # tokens per held-out document, chat or prompt (capped by the model's positions)
    prompt_items: int = 64  # multiple-choice items built from the held-out documents; 0 = no prompting evaluation
    few_shot: int = 2  # solved items shown before each item by the few_shot template
    lm_eval_documents: int = 64  # held-out documents lm-evaluation-harness scores (aigc_heldout); 0 = lm-eval off
    lm_eval_instructions: int = 16  # held-out chats whose greedy answers lm-eval grades (aigc_heldout_instructions)
    prompts: tuple[str, ...] = (
        "Continue this text:\nThe \"for\" statement is used to iterate over the elements of a sequence.",
        "What comes next?\nA function definition defines a user-defined function object.",
        "Write the next sentence of this passage:\nThe \"if\" statement is used for conditional execution.",
    )


STAGES = {
    "pretrain": Stage("pretrain", PretrainConfig, "recipes.pretrain:run", inputs=("tokenize",),
                      key_metrics=("params", "layout", "val_loss", "unigram_val_loss", "val_ppl", "tokens_per_s"),
                      multi_rank=True, dry_run="recipes.parallel_plan:dry_run"),
    "sft": Stage("sft", SFTConfig, "recipes.sft:run", inputs=("curate", "tokenize", "pretrain"), path_fields=("data_files",),
                 key_metrics=("mode", "val_loss_before", "val_loss_after", "trainable_fraction", "steps"),
                 multi_rank=True),
    "evaluate": Stage(
        "evaluate", EvaluateConfig, "recipes.evaluate:run", inputs=("tokenize", "pretrain", "sft", "align"),
        key_metrics=("pretrain_ppl", "sft_ppl", "align_ppl", "pretrain_acc_few_shot", "sft_acc_few_shot"),
    ),
}

# The LLM chain, what `aigc run` runs: it spans the curation, recipes, alignment and deploy packages.
CHAINS = {"llm": ("curate", "tokenize", "pretrain", "sft", "align", "evaluate", "export", "serve")}

COMMANDS = {
    "eval-checkpoint": ("recipes.eval_checkpoint:main",
                        "perplexity and greedy/sampled generations of any HF checkpoint directory"),
}

# Named configs: this package's overrides (tiny = the dataclass defaults; smoke = the end-to-end test's).
PRESETS = {
    "tiny": [],
    "smoke": [
        "pretrain.model=micro",
        "pretrain.max_steps=20",
        "pretrain.eval_every=10",
        "sft.max_steps=10",
        "sft.max_examples=64",
        "evaluate.max_batches=2",
        "evaluate.max_new_tokens=8",
    ],
}
