"""lm-evaluation-harness on our checkpoints, offline: the held-out documents as a rolling-loglikelihood task.

The task is lm-eval's own `loglikelihood_rolling` (as its wikitext task), over a
local JSON-lines file of {"id", "text"} documents, run through lm-eval's HF
model class (`HFLM`) on the loaded checkpoint. Each document is scored exactly
as `evaluate` and pretraining see it: after an eos (lm-eval's prefix token set
to eos) and with its closing eos (appended to the target), so on documents that
fit the context lm-eval's summed log-likelihood equals ours (tests/test_evaluate.py);
longer documents lm-eval scores in rolling windows of the context, where ours
truncates. lm-eval reports word and byte perplexity and bits per byte, which
compare across tokenizers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

TASK = "aigc_heldout"


def heldout_task(documents: Path, eos: str) -> dict:
    """Return the lm-eval task config scoring each document of the JSON-lines file `documents`, closing `eos` included."""
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(documents).resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}" + eos,
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    }


def _simple_evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list, max_length: int,
                     batch_size: int) -> dict:
    """Return lm-eval's simple_evaluate results of `tasks` (configs or registered names) on the loaded model."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded at run time
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              prefix_token_id=tokenizer.eos_token_id)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars and "not a git repository" notes
        return simple_evaluate(model=lm, tasks=tasks, log_samples=True, verbosity="WARNING")


def score_heldout(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, documents: Path, max_length: int,
                  batch_size: int) -> dict:
    """Return lm-eval's figures on the documents: {"loglikelihood" (summed), "documents", "word_perplexity",
    "byte_perplexity", "bits_per_byte"}."""
    results = _simple_evaluate(model, tokenizer, [heldout_task(documents, tokenizer.eos_token)], max_length,
                               batch_size)
    figures = results["results"][TASK]
    samples = results["samples"][TASK]
    return {
        "loglikelihood": sum(_loglikelihood(s["filtered_resps"][0]) for s in samples),
        "documents": len(samples),
        **{k: figures[f"{k},none"] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
    }


def run_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], documents: Path,
              max_length: int, batch_size: int) -> dict[str, dict]:
    """Return {task: {metric: value}} of lm-eval tasks `names`: TASK is ours over `documents`, any other name an
    lm-eval registered task, whose dataset must already be on this machine (HF cache). Raises ValueError in one
    line where a task is unknown or its data cannot be read offline."""
    tasks = [heldout_task(documents, tokenizer.eos_token) if n == TASK else n for n in names]
    try:
        results = _simple_evaluate(model, tokenizer, tasks, max_length, batch_size)
    except Exception as exc:  # lm-eval and datasets raise many kinds; the user needs the first line
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"lm-eval tasks {', '.join(names)}: {type(exc).__name__}: {first}") from None
    return {task: {k.split(",")[0]: v for k, v in figures.items() if "," in k and "stderr" not in k}
            for task, figures in results["results"].items()}


def _loglikelihood(response) -> float:
    """Return the log-likelihood of one rolling response (a float, or a 1-tuple of one)."""
    return float(response[0] if isinstance(response, (tuple, list)) else response)
