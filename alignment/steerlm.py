"""SteerLM: attribute prediction, attribute-conditioned SFT, generation steered by requested attribute values.

1. Rule-based labels on the preference data, two attributes on a 0-4 scale:
   helpfulness (4 for the chosen answer, 0 for the rejected one) and
   verbosity (the answer's word count, in quintiles of the training answers).
   The corpus-built answers are all one sentence (12-20 words), too alike to
   teach verbosity, so each chosen answer also comes as its first quarter
   and first half (still a true continuation, shorter).
2. An attribute-prediction model (the SFT checkpoint with a 2-output
   regression head, read at the answer's last token) learns them; with
   steer_labels="model" it labels the training answers, as SteerLM's
   annotation step does (on the tiny default its labels are noisier than the
   rules they learn from, and steering weakens: "rules" is the default).
3. Attribute-conditioned SFT: each answer is trained after its prompt plus
   the labels, "<attr> helpfulness:4 verbosity:1", loss on the answer only.
4. Steering: the model answers held-out prompts under each requested
   verbosity; the measured word count of its answers should follow it.
"""

from __future__ import annotations

import bisect
import statistics

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.policy import Rollout, generate, last_token_scores, pack
from alignment.reward_model import LoopSettings, encode_answer, train_loop
from recipes import hf_lm

ATTRIBUTES = ("helpfulness", "verbosity")
LEVELS = 5  # attribute values 0..4
SHORTER_FRACTIONS = (0.25, 0.5)  # shorter forms of each chosen answer: its first quarter and half of the words


def word_count(text: str) -> int:
    """Return the number of whitespace-separated words of `text` (the measured verbosity)."""
    return len(text.split())


def verbosity_edges(answers: list[str]) -> list[float]:
    """Return the 4 word-count cut points splitting `answers` into 5 equally filled verbosity levels."""
    return statistics.quantiles([word_count(a) for a in answers], n=LEVELS, method="inclusive")


def verbosity_level(text: str, edges: list[float]) -> int:
    """Return the verbosity level 0..4 of `text`: how many cut points its word count exceeds."""
    return bisect.bisect_left(edges, word_count(text))


def shorter(text: str, fraction: float) -> str:
    """Return the first `fraction` of the words of `text` (at least 2)."""
    words = text.split()
    return " ".join(words[: max(2, int(len(words) * fraction))])


def labelled_answers(pairs: list[dict]) -> list[dict]:
    """Return {"prompt", "answer", "helpfulness"} for each pair's chosen answer, its shorter forms, its rejected one.

    helpfulness is 4 for the chosen answer and its first quarter and half, 0
    for the rejected answer; verbosity_labels adds the verbosity.
    """
    items = []
    for p in pairs:
        chosen = p["chosen"][0]["content"]
        answers = [(chosen, LEVELS - 1)] + [(shorter(chosen, f), LEVELS - 1) for f in SHORTER_FRACTIONS]
        answers.append((p["rejected"][0]["content"], 0))
        items += [{"prompt": p["prompt"], "answer": a, "helpfulness": h} for a, h in answers if a]
    return items


def with_verbosity(items: list[dict], edges: list[float]) -> list[dict]:
    """Return `items` each with its rule-based "verbosity" level (word count against `edges`)."""
    return [{**item, "verbosity": verbosity_level(item["answer"], edges)} for item in items]


def attribute_prompt(prompt: list[dict], helpfulness: int, verbosity: int) -> list[dict]:
    """Return `prompt` with the requested attribute values appended to its last turn.

    Last, right before the answer (as SteerLM's template puts them after the
    assistant label): a small model attends to them far more easily there.
    """
    request = f"<attr> helpfulness:{helpfulness} verbosity:{verbosity}"
    return prompt[:-1] + [{**prompt[-1], "content": f"{prompt[-1]['content']}\n{request}"}]


def _rollout(tokenizer: PreTrainedTokenizerBase, items: list[dict], max_length: int) -> Rollout:
    """Return the Rollout of labelled answers to their prompts."""
    encoded = [encode_answer(tokenizer, item["prompt"], item["answer"], max_length) for item in items]
    return pack([p for p, _ in encoded], [a for _, a in encoded], tokenizer.pad_token_id)


def train_attribute_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[dict],
    max_length: int,
    settings: LoopSettings,
) -> list[float]:
    """Train the 2-output head model to predict attribute / 4 (mean squared error); return each step's loss."""

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, float]:
        batch = [items[i] for i in rows]
        predicted = last_token_scores(model, _rollout(tokenizer, batch, max_length))  # (B, 2)
        target = torch.tensor([[b[a] / (LEVELS - 1) for a in ATTRIBUTES] for b in batch], device=predicted.device)
        return F.mse_loss(predicted, target, reduction="sum"), target.numel()

    return train_loop(model, batch_loss, len(items), settings, "attribute model")


@torch.no_grad()
def predict_attributes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[dict], max_length: int, batch_size: int
) -> list[dict[str, int]]:
    """Return the predicted attribute levels {"helpfulness", "verbosity"} (rounded, 0..4) of each item."""
    model.eval()
    predicted = []
    for s in range(0, len(items), batch_size):
        scores = last_token_scores(model, _rollout(tokenizer, items[s : s + batch_size], max_length))  # (B, 2)
        levels = (scores * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()
        predicted += [dict(zip(ATTRIBUTES, row.tolist())) for row in levels]
    return predicted


def attribute_accuracy(predicted: list[dict[str, int]], items: list[dict]) -> dict[str, float]:
    """Return per attribute the share of exact levels and the mean absolute level error."""
    figures = {}
    for a in ATTRIBUTES:
        errors = [abs(p[a] - item[a]) for p, item in zip(predicted, items)]
        figures[f"{a}_accuracy"] = sum(e == 0 for e in errors) / len(errors)
        figures[f"{a}_mae"] = sum(errors) / len(errors)
    return figures


def conditioned_examples(
    tokenizer: PreTrainedTokenizerBase, items: list[dict], labels: list[dict[str, int]], max_length: int
) -> list[dict[str, list[int]]]:
    """Return SFT examples (input_ids, labels on the answer) of each answer after its attribute system turn."""
    return [
        hf_lm.encode_chat(
            tokenizer,
            attribute_prompt(item["prompt"], label["helpfulness"], label["verbosity"])
            + [{"role": "assistant", "content": item["answer"]}],
            max_length,
        )
        for item, label in zip(items, labels)
    ]


def train_conditioned(
    policy: PreTrainedModel, examples: list[dict[str, list[int]]], pad_id: int, settings: LoopSettings
) -> list[float]:
    """Train the policy's trainable weights on attribute-conditioned examples (loss on answers); return the losses."""

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, float]:
        batch = {k: v.to(policy.device) for k, v in hf_lm.pad_batch([examples[i] for i in rows], pad_id).items()}
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]  # token t+1 is predicted at position t
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                              ignore_index=hf_lm.IGNORE, reduction="sum")
        return nll, int((targets != hf_lm.IGNORE).sum())

    return train_loop(policy, batch_loss, len(examples), settings, "steerlm SFT")


@torch.no_grad()
def steered_word_counts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    helpfulness: int,
    max_new_tokens: int,
) -> list[float]:
    """Return, for each requested verbosity 0..4, the mean word count of the greedy answers to `prompts`."""
    means = []
    for verbosity in range(LEVELS):
        ids = [hf_lm.chat_ids(tokenizer, attribute_prompt(p, helpfulness, verbosity), True) for p in prompts]
        rollout = generate(model, ids, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, sample=False)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rollout.responses()]
        means.append(sum(word_count(t) for t in texts) / len(texts))
    return means
