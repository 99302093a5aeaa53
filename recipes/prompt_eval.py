"""Prompting evaluation: "which sentence comes next?", 4-way multiple choice scored by log-likelihood.

Items are built from held-out documents (the evaluate stage uses the tokenize
stage's held-out split, which pretraining never trained on): a document is
cut after a sentence, and the options are the sentence that really follows
plus CHOICES - 1 distractors, sentences from other documents; the correct
option's position is seeded. Every option is scored by its summed token
log-probability after the prompt divided by its characters (the length
normalisation of lm-evaluation-harness's `acc_norm`); the best-scoring
option is the model's answer. Chance is 1 / CHOICES.

Templates, all plain text after an eos (as pretraining saw documents), so a
base model and its tuned versions read the same input:

    zero_shot   Passage: {context}\\nNext sentence: {option}
    few_shot    k solved items of other documents, blank-line separated, then the zero-shot prompt

A prompt too long for the model loses its start (the option is always whole).
"""

from __future__ import annotations

import random

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from recipes import hf_lm
from recipes.instructions import clip_words, split_sentences

CHOICES = 4
TEMPLATES = ("zero_shot", "few_shot")
CONTEXT_CHARS = 160  # the passage shown: its last words up to this many characters
OPTION_CHARS = 80  # each option: its first words up to this many characters


def build_items(docs: list[dict], seed: int, max_items: int) -> list[dict]:
    """Return up to `max_items` items {"id", "context", "options", "answer"} (answer: index of the true option).

    Every cut after a sentence of a document with a sentence after it is a
    candidate; candidates are drawn by a seeded shuffle. Distractors are
    non-first sentences of other documents, distinct from the true option.
    """
    sentences = {d["id"]: split_sentences(d["text"]) for d in docs}
    pool = sorted(
        {(doc_id, clip_words(s, OPTION_CHARS, keep_end=False)) for doc_id, ss in sentences.items() for s in ss[1:]}
    )
    candidates = [(doc_id, cut) for doc_id, ss in sentences.items() for cut in range(1, len(ss))]
    rng = random.Random(seed)
    rng.shuffle(candidates)
    items = []
    for doc_id, cut in candidates:
        if len(items) == max_items:
            break
        ss = sentences[doc_id]
        context = clip_words(" ".join(ss[:cut]), CONTEXT_CHARS, keep_end=True)
        answer = clip_words(ss[cut], OPTION_CHARS, keep_end=False)
        others = list(dict.fromkeys(text for other, text in pool if other != doc_id and text != answer))
        if len(context.split()) < 3 or len(answer.split()) < 2 or len(others) < CHOICES - 1:
            continue
        options = rng.sample(others, CHOICES - 1)
        position = rng.randrange(CHOICES)
        options.insert(position, answer)
        items.append({"id": f"{doc_id}@{cut}", "context": context, "options": options, "answer": position})
    return items


def render(item: dict, template: str, shots: list[dict]) -> str:
    """Return the prompt text of `item` in `template` (shots: solved items shown first in few_shot)."""
    query = f"Passage: {item['context']}\nNext sentence:"
    if template == "zero_shot":
        return query
    if template == "few_shot":
        solved = [f"Passage: {s['context']}\nNext sentence: {s['options'][s['answer']]}" for s in shots]
        return "\n\n".join(solved + [query])
    raise ValueError(f"unknown prompt template {template!r}; choose from {TEMPLATES}")


def pick_shots(items: list[dict], index: int, k: int, seed: int) -> list[dict]:
    """Return `k` items other than items[index] and not from its document, seeded by (seed, index)."""
    doc = items[index]["id"].rsplit("@", 1)[0]
    others = [it for it in items if it["id"].rsplit("@", 1)[0] != doc]
    return random.Random(f"{seed}:shots:{index}").sample(others, min(k, len(others)))


def encode_choices(
    tokenizer: PreTrainedTokenizerBase, prompt: str, options: list[str], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Return (eos + prompt ids, ids of " option" for each option).

    The prompt keeps its end so that prompt + the longest option fit `max_length` positions.
    """
    option_ids = [tokenizer(" " + o, add_special_tokens=False)["input_ids"][: max_length - 1] for o in options]
    prompt_ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids[-(max_length - max(len(o) for o in option_ids)) :], option_ids


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[dict],
    template: str,
    shots: int,
    max_length: int,
    batch_size: int,
    seed: int,
) -> dict:
    """Return {"accuracy", "predictions"} of `model` on `items` in `template` (predictions: chosen option indices)."""
    prompts, options = [], []
    for i, item in enumerate(items):
        prompt = render(item, template, pick_shots(items, i, shots, seed) if template == "few_shot" else [])
        prompt_ids, option_ids = encode_choices(tokenizer, prompt, item["options"], max_length)
        prompts.append(prompt_ids)
        options.append(option_ids)
    pad_id = tokenizer.pad_token_id
    logprobs = hf_lm.choice_logprobs(model, prompts, options, pad_id, batch_size, f"prompting {template}")
    predictions = []
    for item, scores in zip(items, logprobs):
        normalised = [lp / len(o) for lp, o in zip(scores, item["options"])]  # per character (acc_norm)
        predictions.append(max(range(CHOICES), key=normalised.__getitem__))
    correct = sum(p == item["answer"] for p, item in zip(predictions, items))
    return {"accuracy": correct / len(items), "predictions": predictions}
