"""The policy side of RL alignment: rollouts (prompt + sampled response), per-token log-probs, values, the reference.

A Rollout packs a batch as [left-padded prompt | right-padded response], so
every prompt ends at the same column P and response token t sits at column
P + t for every row. Position ids follow the attention mask (as HF `generate`
computes them), so a left-padded row sees the same positions as if unpadded.
Response token t is predicted by the logits at column P + t - 1; values use
the same column (the state in which token t is chosen).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from recipes import hf_lm
from recipes.data_parallel import DataParallel



def device() -> torch.device:
    """Return the device alignment trains on: the GPU where there is one, else the CPU (fp32 on both)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (the HF causal LM at `path` on device(), in eval mode, its tokenizer)."""
    model, tokenizer = hf_lm.load_causal_lm(path)
    return model.to(device()), tokenizer


@dataclasses.dataclass
class Rollout:
    """Prompts and responses of a batch, packed as [left-padded prompt | right-padded response]."""

    input_ids: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R): 1 on prompt and response tokens
    prompt_width: int  # P

    @property
    def response_mask(self) -> torch.Tensor:
        """Return (B, R) float: 1 on response tokens."""
        return self.attention_mask[:, self.prompt_width :].float()

    @property
    def position_ids(self) -> torch.Tensor:
        """Return (B, P+R) positions counted from each row's first real token (pads get 0)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def responses(self) -> list[list[int]]:
        """Return each row's response token ids (unpadded)."""
        rows = self.input_ids[:, self.prompt_width :]
        return [row[: int(n)].tolist() for row, n in zip(rows, self.response_mask.sum(-1))]

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        """Return the sub-batch of `rows`."""
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.prompt_width)

    def to(self, device: torch.device | str) -> "Rollout":
        """Return this rollout on `device`."""
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_width)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollout:
    """Return the Rollout of token-id prompts and responses (prompts left-, responses right-padded)."""
    width_p = max(len(p) for p in prompts)
    width_r = max(max(len(r) for r in responses), 1)
    ids = torch.full((len(prompts), width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, width_p - len(p) : width_p] = torch.tensor(p, dtype=torch.long)
        mask[row, width_p - len(p) : width_p] = 1
        ids[row, width_p : width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[row, width_p : width_p + len(r)] = 1
    return Rollout(ids, mask, width_p)


def answer_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Return the tokens a model emits to answer `text`: its tokens then eos (as the chat template renders it)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[dict]) -> list[int]:
    """Return the tokens of a chat prompt followed by the assistant's generation prompt."""
    return hf_lm.chat_ids(tokenizer, prompt, add_generation_prompt=True)


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Return generated `tokens` up to and including the first eos (all of them where none).

    HF generate pads a row only after its eos, so a row without eos is all real tokens.
    """
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


class SeededSampling(LogitsProcessor):
    """Adds Gumbel noise drawn from one seeded generator per row: greedy decoding then samples softmax(logits).

    argmax(logits + Gumbel noise) is an exact draw from softmax(logits) (the
    Gumbel-max trick), so each row's sample depends on its own seed only, not on
    which other rows share its batch or rank.
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.size(-1), generator=g, dtype=torch.float64)
                               for g in self.generators]).clamp(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(uniform))  # (B, V)
        return scores.float() + gumbel.to(scores.device, torch.float32)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    sample: bool,
    seeds: list[int] | None = None,
) -> Rollout:
    """Return the Rollout (on the model's device) of its responses to token-id `prompts` (HF generate, KV cache).

    sample=True draws from the model's full distribution (temperature 1, no
    top-k/top-p), so the log-probs of response_logprobs are those it was sampled
    from: with `seeds` (one per prompt) each response is drawn by its own
    seeded generator (SeededSampling: the same response whatever the batch),
    else from torch's global RNG. sample=False is greedy.
    """
    batch = pack(prompts, [[] for _ in prompts], pad_id).to(model.device)
    width = batch.prompt_width
    ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]  # (B, P)
    model.eval()
    processors = None
    if sample and seeds is not None:
        sampling, processors = {"do_sample": False}, LogitsProcessorList([SeededSampling(seeds)])
    elif sample:
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    else:
        sampling = {"do_sample": False}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        logits_processor=processors,
        **sampling,
    )  # (B, P + new)
    responses = [cut_at_eos(row[width:].tolist(), eos_id) for row in out]
    return pack(prompts, responses, pad_id).to(model.device)


def sample_sharded(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    seeds: list[int],
    dp: DataParallel,
) -> Rollout:
    """Return the Rollout of sampled responses to every prompt, each rank generating its share (seeded per prompt).

    Every rank returns the same whole Rollout (responses gathered in prompt order).
    """
    mine = dp.share(list(range(len(prompts))))
    part = generate(model, [prompts[i] for i in mine], max_new_tokens, eos_id, pad_id, True, [seeds[i] for i in mine])
    responses = [r for rows in dp.gather_objects(part.responses()) for r in rows]
    return pack(prompts, responses, pad_id).to(model.device)


def response_logits(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Return (B, R, V) logits predicting each response token (on the model's device)."""
    rollout = rollout.to(model.device)
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).logits  # (B, P+R, V)
    width = rollout.prompt_width
    return logits[:, width - 1 : -1].float()  # column P+t-1 predicts response token t


def response_logprobs(model: PreTrainedModel, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log p of each response token, entropy of each predicting distribution), both (B, R), 0 on padding."""
    logp_all = F.log_softmax(response_logits(model, rollout), dim=-1)  # (B, R, V)
    rollout = rollout.to(logp_all.device)
    tokens = rollout.input_ids[:, rollout.prompt_width :]  # (B, R)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, R)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, R)
    mask = rollout.response_mask
    return logp * mask, entropy * mask


def token_values(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Return (B, P+R, L) head outputs at every position of a sequence-scoring model.

    `model` is an HF *ForSequenceClassification (trunk `.model`, linear head
    `.score`, L = num_labels): its own forward pools the same head output at
    the last real token.
    """
    rollout = rollout.to(model.device)
    hidden = model.model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).last_hidden_state  # (B, P+R, H)
    return model.score(hidden).float()  # (B, P+R, L)


def last_token_scores(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Return (B, L) head outputs of a sequence-scoring model at each row's last response token."""
    values = token_values(model, rollout)  # (B, P+R, L)
    last = rollout.prompt_width + rollout.response_mask.sum(-1).long().to(values.device) - 1  # (B,)
    return values[torch.arange(values.size(0), device=values.device), last]  # (B, L)


def response_values(critic: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Return (B, R) the critic's value of the state in which each response token is chosen, 0 on padding."""
    values = token_values(critic, rollout)[..., 0]  # (B, P+R)
    return values[:, rollout.prompt_width - 1 : -1] * rollout.response_mask.to(values.device)


class Reference:
    """The frozen reference policy: a separate model, or the LoRA policy's base with its adapters disabled."""

    def __init__(self, policy: PreTrainedModel, model: PreTrainedModel | None = None):
        if model is None and not isinstance(policy, PeftModel):
            raise ValueError("a reference without its own model needs a LoRA (PeftModel) policy")
        self.policy = policy
        self.model = model.eval().requires_grad_(False) if model is not None else None

    @contextlib.contextmanager
    def active(self) -> Iterator[PreTrainedModel]:
        """Yield a model that computes as the reference does (adapters disabled inside the block for LoRA)."""
        if self.model is not None:
            yield self.model
            return
        with self.policy.disable_adapter():
            yield self.policy

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Return (B, R) the reference's log-probs of the response tokens."""
        with self.active() as model:
            return response_logprobs(model, rollout)[0]
