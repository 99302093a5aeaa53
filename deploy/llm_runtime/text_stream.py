"""Generated tokens -> text, piece by piece, cut at stop strings.

Byte-level BPE splits characters across tokens, so the text is decoded from all new
tokens so far and only the new suffix is handed out, holding back a trailing incomplete
character (U+FFFD) and any tail that could still grow into a stop string.
"""

from __future__ import annotations


class TextStream:
    """The text of one request's generated tokens; `incremental` decodes after every token
    (streaming, stop strings), otherwise only in finish()."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), incremental: bool = False):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.incremental = incremental or bool(self.stop)
        self.ids: list[int] = []
        self.sent = ""  # text handed out so far
        self.stopped = False  # a stop string was generated

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final with it (often "")."""
        self.ids.append(token)
        if not self.incremental:
            return ""
        text = self._cut(self._decode().rstrip("\ufffd"))  # a trailing incomplete character may still change
        if self.stopped:
            return self._hand_out(text)
        return self._hand_out(text[: len(text) - self._stop_prefix_length(text)])

    def finish(self) -> str:
        """Return the rest of the text (the request is done)."""
        return self._hand_out(self._cut(self._decode()))

    @property
    def text(self) -> str:
        """Return the whole text handed out so far."""
        return self.sent

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _cut(self, text: str) -> str:
        """Return `text` up to the first stop string (setting `stopped`), else unchanged."""
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return text[: min(found)]
        return text

    def _stop_prefix_length(self, text: str) -> int:
        """Return the length of the longest tail of `text` that starts some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _hand_out(self, text: str) -> str:
        """Return what `text` adds to the text handed out so far, and remember it as handed out."""
        if not text.startswith(self.sent):  # shorter (held back) or changed: nothing new yet
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
