"""Incremental detokenization with stop strings (host side)."""

from __future__ import annotations


class TextStream:
    """Feed generated ids, get the text that is safe to send.

    Text is held back while it ends in an incomplete UTF-8 character or in a prefix of a stop
    string; at the first stop string the text is cut (the stop string is not returned) and
    ``stopped`` becomes true.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""
        self.steps = 0  # verify steps whose tokens were fed (usage accounting)

    def feed(self, ids: list[int]) -> str:
        """Append ``ids``; the new text to send (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for s in self.stop if (i := text.find(s, max(0, self.sent - len(s) + 1))) >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text, cut)
        safe = len(text.rstrip("\ufffd"))
        hold = max((j for s in self.stop for j in range(len(s) - 1, 0, -1)
                    if text[:safe].endswith(s[:j])), default=0)
        return self._take(text, max(self.sent, safe - hold))

    def flush(self) -> str:
        """The held-back rest at the end of generation."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent:end]
        self.sent = end
        self.text = text[:end]
        return delta
