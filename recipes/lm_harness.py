"""lm-evaluation-harness on our checkpoints, offline: three task YAMLs shipped in recipes/lm_eval_tasks/.

    aigc_heldout               loglikelihood_rolling over held-out documents: word/byte perplexity, bits per byte
    aigc_heldout_cloze         multiple_choice, evaluate's 4-way "which sentence comes next?" items: acc, acc_norm
    aigc_heldout_instructions  generate_until on held-out instructions, greedy, chat template: exact_match

Each YAML is an lm-eval task config over a local JSON-lines file (`dataset_path:
json`, nothing downloaded, HF_DATASETS_OFFLINE=1); the file is per run, so the
YAML names a placeholder and `task_config` reads the YAML and sets
`dataset_kwargs.data_files.test` to the run's file, and writes the model's eos
where the templates have "</s>" (our tokenizer's eos). lm-eval 0.4.13's
TaskManager.load takes a registered name, a YAML path or a whole config, and
overrides no field of the first two, so the configs go to `simple_evaluate` as
dicts, with a TaskManager that indexes lm-eval's own tasks only when a
registered task is asked for (indexing its ~15k tasks takes seconds).

Everything runs through lm-eval's HF model class (`HFLM`) on the loaded
checkpoint. Documents and prompts are scored as `evaluate` and pretraining see
them: after an eos (HFLM's prefix token for the rolling task, "</s>" leading the
cloze prompt), with the closing eos on documents; so where they fit the context
lm-eval's summed document log-likelihood equals ours, its per-option
log-likelihoods equal recipes.prompt_eval's and its acc_norm (best
log-likelihood per character of the option) equals evaluate's zero_shot
accuracy (tests/test_evaluate.py). Where they do not fit, lm-eval scores
documents in rolling windows (ours truncates) and cuts a cloze prompt for each
option (ours for the longest). The instruction task renders each instruction
with the model's chat template (lm-eval's apply_chat_template, in a second
`simple_evaluate` call over the same HFLM) and answers greedily, as
hf_lm.greedy_reply does, stopping at a newline.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from pathlib import Path

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
HELDOUT, CLOZE, INSTRUCTIONS = "aigc_heldout", "aigc_heldout_cloze", "aigc_heldout_instructions"
TASKS = (HELDOUT, CLOZE, INSTRUCTIONS)
CHAT_TASKS = (INSTRUCTIONS,)  # rendered with the model's chat template
YAML_EOS = "</s>"  # the eos the YAML templates are written with (curation.bpe.EOS)


def task_config(name: str, data_file: Path, eos: str) -> dict:
    """Return the lm-eval config of shipped task `name` over JSON-lines `data_file`, `eos` written for "</s>"."""
    cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(Path(data_file).resolve())
    for key in ("doc_to_text", "doc_to_target"):
        if isinstance(cfg.get(key), str):
            cfg[key] = cfg[key].replace(YAML_EOS, eos)
    return cfg


def instruction_items(chats: list[dict]) -> list[dict]:
    """Return {"id", "instruction", "answer"} of each chat that is one user turn and its answer."""
    return [
        {"id": c["id"], "instruction": c["messages"][0]["content"], "answer": c["messages"][1]["content"]}
        for c in chats
        if [m["role"] for m in c["messages"]] == ["user", "assistant"]
    ]


@functools.cache
def _task_manager(registered: bool):
    """Return a TaskManager; it indexes lm-eval's own tasks only where `registered` ones are asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registered)


def _results(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], data: dict[str, Path],
             max_length: int, batch_size: int) -> dict[str, dict]:
    """Return {task: {"figures": lm-eval's results, "samples": its logged samples in document order}}.

    Our tasks (`data`: task -> its data file) go as configs, any other name as an lm-eval registered task.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded at run time
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              prefix_token_id=tokenizer.eos_token_id)
    chat = tokenizer.chat_template is not None  # a base model without one reads the instruction as plain text
    calls = {False: [n for n in names if not (chat and n in CHAT_TASKS)], True: [n for n in names if chat and n in CHAT_TASKS]}
    out = {}
    for apply_chat_template, group in calls.items():
        if not group:
            continue
        tasks = [task_config(n, data[n], tokenizer.eos_token) if n in TASKS else n for n in group]
        manager = _task_manager(any(n not in TASKS for n in group))
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars and "not a git repository" notes
            results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True,
                                      apply_chat_template=apply_chat_template, bootstrap_iters=0,
                                      verbosity="WARNING")
        for task, figures in results["results"].items():
            samples = sorted(results["samples"].get(task, []), key=lambda s: s["doc_id"])
            out[task] = {"figures": figures, "samples": samples}
    return out


def _metrics(figures: dict) -> dict:
    """Return lm-eval's {"metric,filter": value} figures as {metric: value}, stderr left out."""
    return {k.split(",")[0]: v for k, v in figures.items() if "," in k and "stderr" not in k}


def _details(task: str, samples: list[dict]) -> dict:
    """Return the per-item figures of our task `task` from lm-eval's logged samples."""
    if task == HELDOUT:
        return {"documents": len(samples), "loglikelihood": sum(_first(s["filtered_resps"][0]) for s in samples)}
    if task == CLOZE:
        return {"items": len(samples), "loglikelihoods": [[_first(r) for r in s["filtered_resps"]] for s in samples]}
    if task == INSTRUCTIONS:
        return {"items": len(samples), "replies": [s["filtered_resps"][0] for s in samples]}
    return {}


def score_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: dict[str, Path], max_length: int,
                batch_size: int) -> dict[str, dict]:
    """Return {task: figures} of our tasks over their data files (`data`: task -> JSON-lines file):

    aigc_heldout: {"word_perplexity", "byte_perplexity", "bits_per_byte", "documents", "loglikelihood" (summed)};
    aigc_heldout_cloze: {"acc", "acc_norm", "items", "loglikelihoods" (per item, per option)};
    aigc_heldout_instructions: {"exact_match", "items", "replies" (stripped, per item)}.
    """
    results = _results(model, tokenizer, [t for t in TASKS if t in data], data, max_length, batch_size)
    return {task: _metrics(r["figures"]) | _details(task, r["samples"]) for task, r in results.items()}


def run_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], data: dict[str, Path],
              max_length: int, batch_size: int) -> dict[str, dict]:
    """Return {task: figures} of lm-eval tasks `names`: ours (TASKS, over their files in `data`) as score_tasks
    has them, any other name an lm-eval registered task, whose dataset must already be on this machine (HF
    cache): {metric: value}. Raises ValueError in one line where a task is unknown or its data cannot be read
    offline."""
    try:
        results = _results(model, tokenizer, names, data, max_length, batch_size)
    except Exception as exc:  # lm-eval and datasets raise many kinds; the user needs the first line
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"lm-eval tasks {', '.join(names)}: {type(exc).__name__}: {first}") from None
    return {task: _metrics(r["figures"]) | _details(task, r["samples"]) for task, r in results.items()}


def _first(response) -> float:
    """Return the log-likelihood of one response (a float, or a tuple whose first item is one)."""
    return float(response[0] if isinstance(response, (tuple, list)) else response)
