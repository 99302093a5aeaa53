"""Continuous batching: every active request advances by one token per forward step.

The decoder keeps one left-padded batch with its KV cache (L, B, H, P, D). Each step it
first admits waiting requests (one prefill forward for all of them, which also yields
their first token), merges them into the batch, then runs one decode forward for the whole
batch; finished rows leave the batch at once and the columns only they used are trimmed.
A request that arrives while others are mid-answer waits for one step, not for them.

Used two ways: `complete()` decodes a given list of requests to the end in the caller's
thread (Triton's dynamic batch, non-streaming); `start()` runs the loop in a thread that
takes requests from `submit()` as they come (the streaming model).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from .kv_lm import empty_cache
from .sampling import Sampling, choose_tokens, generator_for
from .text_stream import TextStream


@dataclasses.dataclass
class Request:
    """One prompt to complete, and where its text goes."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling | None = None  # None: greedy
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_piece: Callable[[str], None] | None = None  # streaming: each new piece of text
    on_done: Callable[[str], None] | None = None  # the whole text, once
    on_error: Callable[[Exception], None] | None = None


class Overloaded(RuntimeError):
    """The decoder's queue is full."""


class _Row:
    """A request being decoded."""

    def __init__(self, request: Request, tokenizer):
        self.request = request
        self.text = TextStream(tokenizer, request.stop, incremental=request.on_piece is not None)
        self.generator = generator_for(request.seed) if request.sampling is not None else None
        self.generated = 0


class BatchDecoder:
    """Decodes requests in one continuously refilled batch of at most `max_rows` rows.

    `step` is a kv_lm step function; `on_step(rows)` (optional) is told the batch size of
    every decode step. At most `max_pending` submitted requests wait for a row: submit()
    refuses more (Overloaded), so a flood of requests cannot grow the queue without bound.
    """

    def __init__(self, step, tokenizer, eos_id: int | None, pad_id: int, max_rows: int = 64,
                 on_step: Callable[[int], None] | None = None, max_pending: int = 256):
        self.step, self.tokenizer, self.eos_id, self.pad_id = step, tokenizer, eos_id, pad_id
        self.max_rows, self.on_step, self.max_pending = max_rows, on_step, max_pending
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._reset()

    def _reset(self) -> None:
        self._rows: list[_Row] = []
        self._keys = self._values = None  # (L, B, H, P, D)
        self._mask = None  # (B, P) 1 on real tokens
        self._positions = None  # (B,) position id of the next input token
        self._next = None  # (B,) next input token

    # -- entry points ---------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; the decoding thread (start()) admits it at its next step.

        Raises Overloaded where `max_pending` requests already wait.
        """
        with self._wake:
            if len(self._pending) >= self.max_pending:
                raise Overloaded(f"the model's queue is full: {len(self._pending)} requests wait for one of "
                                 f"{self.max_rows} rows (max_queue_size {self.max_pending}); retry later")
            self._pending.append(request)
            self._wake.notify()

    def complete(self, requests: list[Request]) -> list[str]:
        """Decode `requests` to the end in this thread (not while start()ed); return their texts.
        Their on_done/on_error are replaced; raises the first error of a request or a step."""
        texts: dict[int, str] = {}
        errors: list[Exception] = []
        for i, request in enumerate(requests):
            request.on_done = lambda text, i=i: texts.__setitem__(i, text)
            request.on_error = errors.append
            self._pending.append(request)
        while self._pending or self._rows:
            self.step_once()
        if errors:
            raise errors[0]
        return [texts[i] for i in range(len(requests))]

    def start(self) -> None:
        """Start the decoding thread, which serves submit()ted requests until stop()."""
        self._thread = threading.Thread(target=self._serve, name="batch-decoder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the decoding thread; requests not finished get an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        with self._wake:
            waiting, self._pending = list(self._pending), collections.deque()
        self._fail(RuntimeError("the model is shutting down"), waiting + [row.request for row in self._rows])

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._pending or self._rows or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step_once()

    # -- one step ----------------------------------------------------------------------------

    def step_once(self) -> None:
        """Admit waiting requests (prefill), then advance every row by one token."""
        admitted = []
        with self._wake:
            while self._pending and len(self._rows) + len(admitted) < self.max_rows:
                admitted.append(_Row(self._pending.popleft(), self.tokenizer))
        try:
            if admitted:
                self._prefill(admitted)
                admitted = []
            if self._rows:
                self._decode()
        except Exception as exc:  # a failing model fails the requests in flight, not the decoder
            self._fail(exc, [row.request for row in self._rows + admitted])
            self._reset()

    def _prefill(self, rows: list[_Row]) -> None:
        width = max(len(row.request.prompt_ids) for row in rows)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(r.request.prompt_ids)) + r.request.prompt_ids for r in rows]
        )  # (N, T) left padded
        mask = torch.tensor(
            [[0] * (width - len(r.request.prompt_ids)) + [1] * len(r.request.prompt_ids) for r in rows]
        )  # (N, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
        keys, values = empty_cache(self.step.geometry, len(rows))
        logits, keys, values = self.step(input_ids, mask, positions, keys, values)  # (N, V), (L, N, H, T, D)
        tokens = self._choose(logits, rows)
        keep = self._advance(rows, tokens)
        if keep:
            self._merge(
                [rows[i] for i in keep], keys[:, keep], values[:, keep], mask[keep],
                mask.sum(-1)[keep], torch.tensor(tokens)[keep],
            )

    def _decode(self) -> None:
        mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=self._mask.dtype)], dim=1)  # (B, P+1)
        logits, keys, values = self.step(
            self._next[:, None], mask, self._positions[:, None], self._keys, self._values
        )  # (B, V), (L, B, H, P+1, D)
        if self.on_step is not None:
            self.on_step(len(self._rows))
        tokens = self._choose(logits, self._rows)
        keep = self._advance(self._rows, tokens)
        rows = [self._rows[i] for i in keep]
        positions, next_tokens = self._positions[keep] + 1, torch.tensor(tokens)[keep]
        self._reset()
        if rows:
            self._merge(rows, keys[:, keep], values[:, keep], mask[keep], positions, next_tokens)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        return choose_tokens(logits, [r.request.sampling for r in rows], [r.generator for r in rows])

    def _advance(self, rows: list[_Row], tokens: list[int]) -> list[int]:
        """Hand out each row's new token; return the indices of the rows that go on."""
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            try:
                done = token == self.eos_id
                if not done:
                    row.generated += 1
                    self._send(row, row.text.push(token))
                    done = row.text.stopped or row.generated >= row.request.max_tokens
                if done:
                    self._send(row, row.text.finish())
                    if row.request.on_done is not None:
                        row.request.on_done(row.text.text)
                else:
                    keep.append(i)
            except Exception as exc:  # e.g. the client went away: drop this row only
                self._fail(exc, [row.request])
        return keep

    @staticmethod
    def _send(row: _Row, piece: str) -> None:
        if piece and row.request.on_piece is not None:
            row.request.on_piece(piece)

    def _merge(self, rows, keys, values, mask, positions, next_tokens) -> None:
        """Add rows (their cache (L, N, H, P', D), mask (N, P')) to the batch, left padding the shorter."""
        if self._rows:
            width = max(self._mask.shape[1], mask.shape[1])
            keys = torch.cat([_left_pad(self._keys, width, 3), _left_pad(keys, width, 3)], dim=1)
            values = torch.cat([_left_pad(self._values, width, 3), _left_pad(values, width, 3)], dim=1)
            mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)], dim=0)
            positions = torch.cat([self._positions, positions])
            next_tokens = torch.cat([self._next, next_tokens])
            rows = self._rows + rows
        first = int(mask.any(dim=0).int().argmax())  # columns before it are padding in every row
        self._rows, self._keys, self._values = rows, keys[:, :, :, first:], values[:, :, :, first:]
        self._mask, self._positions, self._next = mask[:, first:], positions, next_tokens

    @staticmethod
    def _fail(exc: Exception, requests: list[Request]) -> None:
        """Tell each of `requests` that it failed with `exc`."""
        for request in requests:
            if request.on_error is not None:
                try:
                    request.on_error(exc)
                except Exception:  # the error cannot reach a client that is gone
                    pass


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Return `tensor` left padded with zeros along `dim` to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
