"""Response shaping for the OpenAI-compatible API: choices, logprobs, usage, stream chunks.

A request holds one ``Choice`` per generated sequence (prompts x n, indexed prompt-major as
OpenAI does). ``Shaper`` turns choices into OpenAI's JSON: completions logprobs as
``{tokens, token_logprobs, top_logprobs, text_offset}`` (``top_logprobs`` maps the N most likely
tokens, and the chosen one, to their logprobs), chat logprobs as ``{content: [{token, logprob,
bytes, top_logprobs}]}``. Logprobs are the verifier's raw ``log_softmax`` (``-inf`` is sent as
-9999.0, as vLLM does: JSON has no infinity).

A token is shown as its text when its bytes are whole UTF-8, else as ``bytes:\\xNN...`` of its
own bytes (as OpenAI does): byte-level BPE splits a CJK character or an emoji over several tokens,
and decoding such a piece alone gives U+FFFD, which would make distinct tokens collide as keys of
``top_logprobs``. Chat's ``bytes`` are the token's own bytes. ``text_offset`` counts the characters
of the text before the token (a character split over tokens starts at the first of them).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import re

from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

from quasar_jax.cli.text_stream import TextStream
from quasar_jax.speculative.results import TokenLogprob

FLOOR = -9999.0


@dataclasses.dataclass
class Choice:
    """One choice's host state."""

    index: int
    text: TextStream
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of text.ids
    finish: str | None = None
    echo_text: str = ""  # completions with echo: the prompt's text ...
    echo_ids: list[int] = dataclasses.field(default_factory=list)  # ... ids ...
    echo_logprobs: list[TokenLogprob | None] | None = None  # ... and logprobs (first None)

    @property
    def tokens(self) -> list[int]:
        return self.text.ids[:self.text.kept]


@dataclasses.dataclass
class Delta:
    """What one event added to a choice (a stream chunk's content)."""

    choice: Choice
    text: str
    ids: list[int]
    logprobs: list[TokenLogprob | None] | None
    finish: str | None = None
    first: bool = False  # the first token of the text is the prompt's first (its logprob is null)


class TokenPieces:
    """Each token's own bytes and the text the API shows for it (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.added = set(getattr(tokenizer, "added_tokens_decoder", None) or ())
        self._bytes: dict[int, bytes] = {}
        self._text: dict[int, str] = {}

    def bytes(self, tid: int) -> bytes:
        if tid not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(tid)
            if piece and self.byte_level and tid not in self.added and all(c in self.byte_of for c in piece):
                out = bytes(self.byte_of[c] for c in piece)  # byte-level BPE: one character per byte
            elif piece and (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)):
                out = bytes([int(m.group(1), 16)])  # SentencePiece byte fallback
            else:  # a special token, or an id the tokenizer does not know: what it decodes to
                out = self.tokenizer.decode([tid], skip_special_tokens=False).encode("utf-8")
            self._bytes[tid] = out
        return self._bytes[tid]

    def text(self, tid: int) -> str:
        if tid not in self._text:
            raw = self.bytes(tid)
            try:
                raw.decode("utf-8")
                self._text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
            except UnicodeDecodeError:
                self._text[tid] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self._text[tid]


class TextOffsets:
    """``text_offset`` of consecutive tokens: characters completed before each one."""

    def __init__(self):
        self.at = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def advance(self, raw: bytes) -> int:
        start = self.at
        self.at += len(self._utf8.decode(raw))
        return start


def _lp(x: float) -> float:
    return max(x, FLOOR) if not math.isnan(x) else FLOOR


class Shaper:
    """JSON of one request's responses (``kind``: completions | chat)."""

    def __init__(self, tokenizer, kind: str, model: str, rid: str, created: int, *,
                 logprobs: int | None, as_ids: bool = False, pieces: TokenPieces | None = None):
        self.tokenizer, self.kind, self.model, self.rid, self.created = tokenizer, kind, model, rid, created
        self.n_logprobs, self.as_ids = logprobs, as_ids
        self.pieces = pieces or TokenPieces(tokenizer)

    def token(self, tid: int) -> str:
        return f"token_id:{tid}" if self.as_ids else self.pieces.text(tid)

    # ------------------------------------------------------------------ logprobs
    def completion_logprobs(self, ids, lps, offsets: TextOffsets, first: bool = False) -> dict:
        """Completions' logprobs object of ``ids``, their text offsets continuing ``offsets``."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j, (tid, lp) in enumerate(zip(ids, lps)):
            piece = self.token(tid)
            out["tokens"].append(piece)
            out["text_offset"].append(offsets.advance(self.pieces.bytes(tid)))
            if lp is None or (first and j == 0):
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.token(t): _lp(v) for t, v in lp.top}
            top.setdefault(piece, _lp(lp.logprob))
            out["token_logprobs"].append(_lp(lp.logprob))
            out["top_logprobs"].append(top)
        return out

    def chat_logprobs(self, ids, lps) -> dict:
        def entry(tid, value):
            piece = self.token(tid)
            return {"token": piece, "logprob": _lp(value), "bytes": list(self.pieces.bytes(tid))}
        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
                            for t, lp in zip(ids, lps)]}

    # ------------------------------------------------------------------ bodies
    def usage(self, prompt_tokens: int, choices: list[Choice]) -> dict:
        n = sum(len(c.tokens) for c in choices)
        steps = sum(c.text.steps for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
                "verify_steps": steps, "accepted_tokens": max(0, n - steps)}

    def object(self, chunk: bool) -> str:
        if self.kind == "chat":
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def body(self, choices: list[Choice], usage: dict) -> dict:
        """The whole (non-streamed) response."""
        out = []
        for c in choices:
            lps = None
            if self.kind == "chat":
                if self.n_logprobs is not None:
                    lps = self.chat_logprobs(c.tokens, c.logprobs)
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                            "logprobs": lps, "finish_reason": c.finish})
                continue
            if self.n_logprobs is not None:
                echo = c.echo_logprobs or [None] * len(c.echo_ids)
                lps = self.completion_logprobs(c.echo_ids + c.tokens, echo + c.logprobs[:len(c.tokens)],
                                               TextOffsets(), first=bool(c.echo_ids))
            out.append({"index": c.index, "text": c.echo_text + c.text.text, "logprobs": lps,
                        "finish_reason": c.finish})
        return {"id": self.rid, "object": self.object(False), "created": self.created, "model": self.model,
                "choices": out, "usage": usage}

    def chunk(self, d: Delta, offsets: dict, usage: dict | None = None) -> str:
        """One server-sent event for ``d``; ``offsets`` tracks each choice's text offset."""
        c = d.choice
        lps = None
        if self.kind == "chat":
            if self.n_logprobs is not None and d.ids:
                lps = self.chat_logprobs(d.ids, d.logprobs)
            delta = {"content": d.text} if d.text else {}
            choice = {"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": d.finish}
        else:
            if self.n_logprobs is not None and d.ids:
                lps = self.completion_logprobs(d.ids, d.logprobs or [None] * len(d.ids),
                                               offsets.setdefault(c.index, TextOffsets()), first=d.first)
            choice = {"index": c.index, "text": d.text, "logprobs": lps, "finish_reason": d.finish}
        return self.event([choice], usage)

    def role_chunk(self, index: int) -> str:
        return self.event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}])

    def event(self, choices: list, usage: dict | None = None) -> str:
        obj = {"id": self.rid, "object": self.object(True), "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return "data: " + json.dumps(obj) + "\n\n"
