"""Time per token of the server's incremental detokenization, against re-decoding every id of a
choice at each step (what ``TextStream.feed`` did before ``DecodeStream``).

The demo model writes one long greedy choice of ``--tokens`` ids (autoregressive, float32,
``ignore_eos``); the ids are fed to each detokenizer one verify step at a time (``--per-step``
ids per feed, a stop string that never matches held against every feed) and the wall time per
token is reported for the whole choice and for its last 512 tokens, where quadratic work shows.

    python scripts/bench_detokenize.py --tokens 4096 --out docs/results/detokenize_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from quasar_jax.cli.text_stream import TextStream


class RedecodeStream:
    """The previous algorithm: decode all ids at every feed, hold back an incomplete character and
    stop-string prefixes."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], 0

    def feed(self, ids):
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if any(text.find(s, max(0, self.sent - len(s) + 1)) >= 0 for s in self.stop):
            raise AssertionError("the stop string never matches")
        safe = len(text.rstrip("\ufffd"))
        hold = max((j for s in self.stop for j in range(len(s) - 1, 0, -1) if text[:safe].endswith(s[:j])), default=0)
        end = max(self.sent, safe - hold)
        delta, self.sent = text[self.sent:end], end
        return delta


def time_per_token(make, ids, per_step: int) -> dict:
    stream = make()
    marks, out = [], []
    t0 = time.perf_counter()
    for at in range(0, len(ids), per_step):
        out.append(stream.feed(ids[at:at + per_step]))
        marks.append((at + per_step, time.perf_counter() - t0))
    total = marks[-1][1]
    tail_at = next(t for n, t in marks if n >= len(ids) - 512)
    return {"us_per_token": 1e6 * total / len(ids), "last_512_us_per_token": 1e6 * (total - tail_at) / 512,
            "text": "".join(out)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--per-step", type=int, default=2, help="ids per feed (a verify step's accepted tokens)")
    p.add_argument("--prompt", default="def main():\n")
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {os.cpu_count()} cores")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import quasar_jax as qj
    from quasar_jax.speculative.engine import Engine, GenerationConfig

    model, tok = qj.load("demo", dtype="float32")
    prompt = tok(args.prompt)["input_ids"]
    cfg = GenerationConfig(max_new_tokens=args.tokens, drafter="none", max_len=len(prompt) + args.tokens + 8,
                           stop_ids=(), allow_long_context=True)
    ids = [int(t) for t in Engine(model).generate([prompt], cfg).tokens[0]][:args.tokens]
    stop = ["@@never@@"]
    rows = {}
    for name, make in (("redecode (before)", lambda: RedecodeStream(tok, stop)),
                       ("TextStream (DecodeStream)", lambda: TextStream(tok, stop))):
        rows[name] = time_per_token(make, ids, args.per_step)
    texts = {r.pop("text") for r in rows.values()}
    assert len(texts) == 1, "the two detokenizers disagree"
    report = {"machine": args.machine, "loadavg": os.getloadavg(), "tokens": len(ids), "per_step": args.per_step,
              "results": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
