"""What the sft, align and evaluate stages do with an HF causal LM: load, encode, score, generate.

Chat sequences are tokenized exactly as `tokenizer.apply_chat_template(...,
tokenize=True)` does (no special tokens added beyond the template's), which is
also how TRL tokenizes conversational data, so SFT, DPO and generation see the
same token sequences.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from recipes.sft_recipes import LLAMA_LINEAR

IGNORE = -100  # label of a position that is not scored
MAX_PROMPT_SHARE = 0.75  # a training chat is used only if its prompt takes at most this share of max_length


def load_causal_lm(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (fp32 model in eval mode, tokenizer) of the local HF checkpoint at `path`."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer


def add_lora(model: PreTrainedModel, rank: int, alpha: int, dropout: float = 0.0,
             targets: tuple[str, ...] = LLAMA_LINEAR, use_dora: bool = False) -> PeftModel:
    """Return `model` wrapped with a fresh peft LoRA (DoRA with `use_dora`) adapter; only the adapter is trainable.

    The default, no dropout, is what the alignment policies need: PPO/GRPO
    ratios compare the policy with itself, which must be deterministic.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        use_dora=use_dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adamw_with_schedule(params: list[torch.nn.Parameter], learning_rate: float, warmup_steps: int,
                        steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Return (AdamW without weight decay, its LR schedule): linear warmup over `warmup_steps` (capped at `steps`),
    then linear decay to zero at `steps`; the schedule steps once per optimizer step."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = min(warmup_steps, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(steps - warmup, 1))
    )
    return optimizer, schedule


def context_length(model: PreTrainedModel, limit: int) -> int:
    """Return the tokens a sequence may have: `limit`, capped by the model's position count."""
    return min(limit, model.config.max_position_embeddings)


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False
) -> list[int]:
    """Return the token ids of `messages` rendered by the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def prompt_fits(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], max_length: int) -> bool:
    """Return True where the chat `prompt` (with generation prompt) leaves a quarter of max_length to answer."""
    return len(chat_ids(tokenizer, prompt, add_generation_prompt=True)) <= MAX_PROMPT_SHARE * max_length


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """Return {"input_ids", "labels"} of a chat; labels are IGNORE except on assistant turns.

    An assistant turn is everything the template renders for it after the
    generation prompt (content, eos, trailing newline), as TRL's completion
    mask has it. Sequences longer than `max_length` keep their start.
    """
    input_ids = chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a chat must not open with an assistant turn: it has no prompt to answer")
        prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = chat_ids(tokenizer, messages[: i + 1])
        start = len(prompt)
        if upto[:start] != prompt or input_ids[: len(upto)] != upto:
            raise ValueError(
                f"chat template does not render turn {i} as a token prefix of the whole chat; "
                "assistant tokens cannot be located"
            )
        labels[start : len(upto)] = upto[start:]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> dict[str, list[int]]:
    """Return {"input_ids", "labels"} of plain text as pretraining packed it: eos + tokens + eos.

    Pretraining sequences are documents each followed by eos, packed, so a
    document's context starts right after the previous document's eos. Every
    token after that leading eos is scored (the text and its closing eos).
    """
    eos = tokenizer.eos_token_id
    ids = ([eos] + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Return right-padded tensors input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def batch_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Return (summed next-token NLL, number of scored tokens) of a padded batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll.item(), int((targets != IGNORE).sum())


def mean_nll(
    model: PreTrainedModel,
    examples: list[dict[str, list[int]]],
    pad_id: int,
    batch_size: int,
    max_batches: int = 0,
    desc: str = "nll",
) -> tuple[float, int]:
    """Return (token-weighted mean NLL, scored tokens) over `examples` (max_batches 0 = all)."""
    model.eval()
    starts = list(range(0, len(examples), batch_size))
    if max_batches:
        starts = starts[:max_batches]
    total, count = 0.0, 0
    for s in tqdm(starts, desc=desc, leave=False):
        nll, n = batch_nll(model, pad_batch(examples[s : s + batch_size], pad_id))
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError("no scored tokens: every example is empty or fully masked")
    return total / count, count


def perplexity(mean_token_nll: float) -> float:
    """Return exp(mean token NLL)."""
    return math.exp(mean_token_nll)


@torch.no_grad()
def greedy_reply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> str:
    """Return the model's greedy reply (HF generate, KV cache) to one user message."""
    ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    input_ids = torch.tensor([ids])  # (1, T)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # (1, T + new)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def pack_examples(examples: list[dict[str, list[int]]], max_length: int, packing: bool) -> list[dict[str, list[int]]]:
    """Return rows {"input_ids", "labels", "position_ids"}: one example per row, or packed several to a row.

    Packing fills each row of at most `max_length` tokens with whole examples
    in order (first fit, next row when the next example does not fit).
    position_ids restart at 0 with each example, which is how transformers
    finds the example boundaries and keeps attention within each example. The
    first label of every example is IGNORE: its first token is not predicted
    from the example before it.
    """
    rows: list[dict[str, list[int]]] = []
    for e in examples:
        n = min(len(e["input_ids"]), max_length)
        if not (packing and rows and len(rows[-1]["input_ids"]) + n <= max_length):
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[-1]
        row["input_ids"] += e["input_ids"][:n]
        row["labels"] += [IGNORE] + e["labels"][1:n]
        row["position_ids"] += list(range(n))
    return rows


def collate_rows(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Return right-padded tensors input_ids, labels, position_ids, each (B, T), from `pack_examples` rows.

    Padding is a segment of its own (positions from 0, labels IGNORE): causal
    attention never lets an earlier token see it, so no attention mask is needed.
    """
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
        "position_ids": torch.arange(width).repeat(len(rows), 1),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        for key in ("input_ids", "labels", "position_ids"):
            batch[key][i, :n] = torch.tensor(r[key])
        batch["position_ids"][i, n:] = torch.arange(width - n)
    return batch


def forward_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Return (summed next-token NLL as a graph-connected scalar, number of scored tokens) of a `collate_rows` batch.

    The batch moves to the model's device. No attention mask and no KV cache:
    transformers then reads example boundaries from the position_ids (packed
    rows get a block-diagonal causal mask).
    """
    device = next(model.parameters()).device
    input_ids, position_ids, labels = (batch[k].to(device) for k in ("input_ids", "position_ids", "labels"))
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return nll, int((targets != IGNORE).sum())



def _choice_row(prompt: list[int], options: list[list[int]]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """Return (tokens, positions, segments, predictor indices per option) of one prompt-with-options row.

    Segment 0 is the prompt, k the k-th option (from 1); option tokens take the
    positions that follow the prompt's. Option token t is predicted at
    predictor index t: the prompt's last token for its first token.
    """
    tokens, positions, segments, predictors = list(prompt), list(range(len(prompt))), [0] * len(prompt), []
    for k, option in enumerate(options, 1):
        start = len(tokens)
        tokens += option
        positions += range(len(prompt), len(prompt) + len(option))
        segments += [k] * len(option)
        predictors.append([len(prompt) - 1] + list(range(start, start + len(option) - 1)))
    return tokens, positions, segments, predictors


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel,
    prompts: list[list[int]],
    options: list[list[list[int]]],
    pad_id: int,
    batch_size: int,
    desc: str = "choices",
) -> list[list[float]]:
    """Return, per prompt, the summed log-probability of each of its options (token id lists) after the prompt.

    Each prompt is read once: its row holds the prompt, then its options one
    after another, each option attending to the prompt and to itself only
    (an additive 4D mask) at the positions that follow the prompt, so the
    scores equal scoring prompt + option as separate sequences.
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    all_rows = [_choice_row(p, o) for p, o in zip(prompts, options)]
    order = sorted(range(len(all_rows)), key=lambda i: len(all_rows[i][0]))  # similar lengths share a batch
    scored: dict[int, list[float]] = {}
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        picked = order[s : s + batch_size]
        rows = [all_rows[i] for i in picked]
        width = max(len(r[0]) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
        positions = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)  # (B, T); -1 = padding
        for i, (t, p, g, _) in enumerate(rows):
            tokens[i, : len(t)], positions[i, : len(p)], segments[i, : len(g)] = (torch.tensor(x) for x in (t, p, g))
        idx = torch.arange(width)
        causal = idx[None, :] <= idx[:, None]  # (T, T): key j at or before query i
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        to_prompt = (segments[:, None, :] == 0) & (segments[:, :, None] >= 0)  # (B, T, T)
        allowed = causal & (same | to_prompt)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        for i, (row, predictors) in enumerate(zip(picked, (r[3] for r in rows))):
            scored[row] = [
                logp[i, pred, tokens[i][segments[i] == k]].sum().item() for k, pred in enumerate(predictors, 1)
            ]
    return [scored[i] for i in range(len(all_rows))]
