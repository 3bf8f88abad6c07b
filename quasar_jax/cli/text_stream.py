"""Incremental detokenization with stop strings (host side), O(1) work per token."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class _WindowDecoder:
    """Incremental decoding for a tokenizer without a ``tokenizers`` backend: each step decodes a
    short window of ids (the ids since the last emitted text and a few before it, for the
    tokenizer's spacing rules) and returns what the new id added, or None while the text ends in
    an incomplete UTF-8 character."""

    CONTEXT = 4

    def __init__(self, tokenizer, decode_kw: dict):
        self.tokenizer, self.decode_kw = tokenizer, decode_kw
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start; ids before ``read`` are emitted

    def step(self, tid: int) -> str | None:
        self.ids.append(tid)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], **self.decode_kw)
        text = self.tokenizer.decode(self.ids[self.prefix:], **self.decode_kw)
        if text.endswith("\ufffd") or len(text) <= len(before):
            return None
        self.read = len(self.ids)
        self.prefix = max(0, self.read - self.CONTEXT)
        return text[len(before):]


class TextStream:
    """Feed generated ids, get the text that is safe to send.

    Text is held back while it ends in an incomplete UTF-8 character or in a prefix of a stop
    string; at the first stop string the text is cut (the stop string is returned only with
    ``include_stop``) and ``stopped`` becomes true. ``kept`` counts the ids that made the text: all
    fed ids, or at a stop string those up to the one that completed it.

    The work per token does not grow with the choice's length: each id is decoded once
    (``tokenizers``' ``DecodeStream``), and only the unsent text and the stop strings' overlap
    with what was sent is kept in a buffer to search.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.decode_kw = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:  # a slow-tokenizer option; fast ones ignore it
            self.decode_kw["spaces_between_special_tokens"] = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._step = lambda tid: stream.step(backend, tid)
        else:
            self._step = _WindowDecoder(tokenizer, self.decode_kw).step
        self._overlap = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._ends: list[int] = []  # characters decoded after each id
        self._buf, self._buf_at = "", 0  # the decoded text from character _buf_at on
        self._sent: list[str] = []  # the text returned, in pieces
        self.sent = 0  # characters returned
        self.stopped = False
        self.steps = 0  # verify steps whose tokens were fed (usage accounting)
        self.kept = 0

    @property
    def text(self) -> str:
        """The text returned so far."""
        return "".join(self._sent)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kw)

    def feed(self, ids: list[int]) -> str:
        """Append ``ids``; the new text to send (may be empty)."""
        if self.stopped:
            return ""
        before = len(self.ids)
        total = self._buf_at + len(self._buf)
        pieces = []
        for tid in ids:
            piece = self._step(tid) or ""
            pieces.append(piece)
            total += len(piece)
            self.ids.append(tid)
            self._ends.append(total)
        self._buf += "".join(pieces)
        self.kept = len(self.ids)
        buf, at = self._buf, self._buf_at
        hit = min(((at + i, s) for s in self.stop if (i := buf.find(s, max(0, self.sent - len(s) + 1 - at))) >= 0),
                  default=None)
        if hit is not None:
            self.stopped = True
            end = hit[0] + len(hit[1])
            self.kept = next((n for n in range(before + 1, len(self.ids)) if self._ends[n - 1] >= end), len(self.ids))
            return self._take(end if self.include_stop else hit[0])
        hold = max((j for s in self.stop for j in range(len(s) - 1, 0, -1) if buf.endswith(s[:j])), default=0)
        return self._take(max(self.sent, total - hold))

    def flush(self) -> str:
        """The held-back rest at the end of generation (an incomplete character as U+FFFD)."""
        if self.stopped:
            return ""
        total = self._buf_at + len(self._buf)
        if self.ids and (tail := self.decode(self.ids[-8:])).endswith("\ufffd"):  # ids the decoder still holds
            full = self.decode(self.ids)  # once per choice
            if len(full) > total:
                self._buf += full[total:]
                total = len(full)
        return self._take(total)

    def _take(self, end: int) -> str:
        delta = self._buf[self.sent - self._buf_at:end - self._buf_at]
        self.sent = end
        self._sent.append(delta)
        cut = max(0, self.sent - self._overlap - self._buf_at)  # keep what a stop string could still span
        self._buf, self._buf_at = self._buf[cut:], self._buf_at + cut
        return delta
