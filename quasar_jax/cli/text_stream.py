"""Incremental detokenization with stop strings (host side)."""

from __future__ import annotations


class TextStream:
    """Feed generated ids, get the text that is safe to send.

    Text is held back while it ends in an incomplete UTF-8 character or in a prefix of a stop
    string; at the first stop string the text is cut (the stop string is returned only with
    ``include_stop``) and ``stopped`` becomes true. ``kept`` counts the ids that made the text: all
    fed ids, or at a stop string those up to the one that completed it.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.decode_kw = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:  # a slow-tokenizer option; fast ones ignore it
            self.decode_kw["spaces_between_special_tokens"] = False
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""
        self.steps = 0  # verify steps whose tokens were fed (usage accounting)
        self.kept = 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kw)

    def feed(self, ids: list[int]) -> str:
        """Append ``ids``; the new text to send (may be empty)."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(ids)
        self.kept = len(self.ids)
        text = self.decode(self.ids)
        hit = min(((i, s) for s in self.stop if (i := text.find(s, max(0, self.sent - len(s) + 1))) >= 0),
                  default=None)
        if hit is not None:
            self.stopped = True
            end = hit[0] + len(hit[1])
            self.kept = next((n for n in range(before + 1, len(self.ids)) if len(self.decode(self.ids[:n])) >= end),
                             len(self.ids))
            return self._take(text, end if self.include_stop else hit[0])
        safe = len(text.rstrip("\ufffd"))
        hold = max((j for s in self.stop for j in range(len(s) - 1, 0, -1)
                    if text[:safe].endswith(s[:j])), default=0)
        return self._take(text, max(self.sent, safe - hold))

    def flush(self) -> str:
        """The held-back rest at the end of generation."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent:end]
        self.sent = end
        self.text = text[:end]
        return delta
