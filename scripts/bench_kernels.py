#!/usr/bin/env python3
"""Benchmark the int8 matmul: XLA reference vs Pallas kernel vs bf16 matmul.

Matmul letters: M rows (= B*T), I input features, O output features.

For each weight shape (I, O), M and x dtype it times, on the current
default backend:

* ``xla-ref``  - :func:`int8_matmul_reference` jitted (XLA),
* ``pallas``   - :func:`int8_matmul` with the backend's Pallas kernel,
* ``bf16-mm``  - an unquantised bf16 x bf16 matmul (what int8 replaces),

for W8A16 and W8A8.  Method: a jitted program applies the op to R distinct
weight copies (distinct, like distinct layers, so the 50 MB H100 L2 cannot
serve repeats); two such programs with R2 copies (R2 * weight bytes ~
``--total-mb``, at most ``--max-copies``) and R1 = R2 // 4 copies are timed
(min over ``--iters`` calls after warm-up) and the time per op is
(t(R2) - t(R1)) / (R2 - R1): the marginal cost of one more op inside a
jitted program, with the fixed per-call cost (dispatch, sync) cancelled.
The "int8 bound" column is int8 weight bytes / peak HBM bandwidth (only for
devices whose bandwidth is in ``PEAK_BW``).

``--sweep`` instead tries GPU block-size candidates for the memory-bound
small-M buckets and prints/saves the best per (M bucket, I, O, act_quant),
ready for ``pallas_kernels/int8_matmul/tuned_block_sizes.py``;
``--tuned-json`` feeds such a file back in place of the table.

Usage: python scripts/bench_kernels.py [--json OUT] [--m 1 8 48] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import BlockSizes  # noqa: E402
from pallas_kernels import int8_matmul  # noqa: E402
from pallas_kernels import int8_matmul_reference  # noqa: E402
from pallas_kernels.int8_matmul import tuned_block_sizes as tbs  # noqa: E402
from pallas_kernels.int8_matmul.wrapper import effective_block_sizes  # noqa: E402

# Nominal peak HBM bandwidth in bytes/s by device family.
PEAK_BW = {
    "H100": 3.35e12,   # H100 SXM5 80GB HBM3
    "H200": 4.8e12,
    "A100": 2.0e12,    # 80GB SXM
    "TPU v4": 1.2e12,
    "TPU v5e": 8.2e11,
    "TPU v5p": 2.76e12,
    "TPU v6e": 1.64e12,
}

DEFAULT_SHAPES = ["1024x3072", "4096x12288", "12288x4096"]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _kernel_backend() -> str:
    return {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend(), "gpu")


def _copies(weight_bytes: int, total_mb: float, max_copies: int) -> int:
    return int(max(2, min(max_copies, -(-total_mb * 2**20 // weight_bytes))))


def _time_fn(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def _make_weights(i, o, r, seed=0):
    key = jax.random.PRNGKey(seed)
    ws = []
    for k in jax.random.split(key, r):
        ws.append(jax.random.randint(k, (i, o), -127, 128, jnp.int32).astype(
            jnp.int8))
    scale = jax.random.uniform(key, (o,), jnp.float32, 1e-3, 1e-2)
    return tuple(ws), scale


def _bench_op(op, x, ws, scale, iters):
    """Marginal device time of one op: two jitted programs apply ``op`` to
    R1 = len(ws) // 4 and R2 = len(ws) distinct weight copies; per-op time
    = (t(R2) - t(R1)) / (R2 - R1), which cancels the fixed per-call cost
    (dispatch, argument handling, sync) that dominates single calls."""
    r2 = len(ws)
    r1 = max(1, r2 // 4)
    f1 = jax.jit(lambda x, ws, s: tuple(op(x, w, s) for w in ws))
    f2 = jax.jit(lambda x, ws, s: tuple(op(x, w, s) for w in ws))
    t1 = _time_fn(f1, (x, ws[:r1], scale), iters)
    t2 = _time_fn(f2, (x, ws, scale), iters)
    return max(t2 - t1, 1e-9) / (r2 - r1)


def _progress(row: dict) -> None:
    print(f"  {row['I']}x{row['O']} M={row['M']} {row['x_dtype']} "
          f"{row['mode']} {row['impl']}: {row['us']:.1f} us", file=sys.stderr,
          flush=True)


def run_bench(args, tuned: dict | None) -> list[dict]:
    device = jax.devices()[0]
    fam = tbs.device_family(device.device_kind)
    peak = PEAK_BW.get(fam)
    backend = _kernel_backend()
    rows = []
    for shape in args.shapes:
        i, o = (int(v) for v in shape.split("x"))
        r = _copies(i * o, args.total_mb, args.max_copies)
        ws, scale = _make_weights(i, o, r)
        ws_bf16 = None
        for m in args.m:
            # Unquantised bf16 baseline (weights 2 bytes/elem).
            if "bf16-mm" in args.impls:
                if ws_bf16 is None:
                    ws_bf16 = tuple((w.astype(jnp.float32) * scale).astype(jnp.bfloat16)
                                    for w in ws)
                xb = jax.random.normal(jax.random.PRNGKey(m), (m, i), jnp.bfloat16)
                t = _bench_op(lambda x, w, s: jnp.dot(x, w), xb, ws_bf16, scale,
                              args.iters)
                rows.append(dict(I=i, O=o, M=m, x_dtype="bf16", mode="bf16",
                                 impl="bf16-mm", us=t * 1e6, weight_bytes=2 * i * o,
                                 blocks=None))
                _progress(rows[-1])
            for dname in args.dtypes:
                dt = DTYPES[dname]
                x = jax.random.normal(jax.random.PRNGKey(m), (m, i), dt)
                for mode in args.modes:
                    aq = mode == "w8a8"
                    if "xla-ref" in args.impls:
                        t = _bench_op(lambda x, w, s: int8_matmul_reference(
                            x, w, s, act_quant=aq), x, ws, scale, args.iters)
                        rows.append(dict(I=i, O=o, M=m, x_dtype=dname, mode=mode,
                                         impl="xla-ref", us=t * 1e6, weight_bytes=i * o,
                                         blocks=None))
                        _progress(rows[-1])
                    if "pallas" in args.impls:
                        bs = None
                        if tuned is not None:
                            bs = tuned.get((tbs.m_bucket(m), i, o, aq))
                        eff = effective_block_sizes(m, i, o, dt, aq, backend=backend,
                                                    block_sizes=bs)
                        try:
                            t = _bench_op(lambda x, w, s: int8_matmul(
                                x, w, s, act_quant=aq, backend=backend,
                                interpret=args.interpret, block_sizes=eff), x, ws, scale,
                                args.iters)
                            us = t * 1e6
                        except Exception as e:  # report and continue
                            print(f"pallas failed I={i} O={o} M={m} {dname} {mode}: "
                                  f"{type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                            us = float("nan")
                        rows.append(dict(I=i, O=o, M=m, x_dtype=dname, mode=mode,
                                         impl="pallas", us=us, weight_bytes=i * o,
                                         blocks=dataclasses.asdict(eff)))
                        _progress(rows[-1])
        del ws, ws_bf16
    for row in rows:
        row["lower_bound_us"] = (row["weight_bytes"] / peak * 1e6) if peak else None
        row["GBps"] = row["weight_bytes"] / (row["us"] * 1e-6) / 1e9
    return rows


def markdown(rows: list[dict], peak) -> str:
    ref = {(r["I"], r["O"], r["M"], r["x_dtype"], r["mode"]): r["us"]
           for r in rows if r["impl"] == "xla-ref"}
    bf = {(r["I"], r["O"], r["M"]): r["us"] for r in rows
          if r["impl"] == "bf16-mm"}
    out = ["| I x O | M | x | mode | impl | time us | weight GB/s | "
           "% peak BW | int8 bound us | vs xla-ref | vs bf16-mm | blocks "
           "(m,o,i,split,warps,stages) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["I"], r["O"], r["M"], r["x_dtype"], r["mode"])
        vs_ref = ref.get(key)
        vs_bf = bf.get((r["I"], r["O"], r["M"]))
        pct = (f"{r['GBps'] * 1e9 / peak * 100:.0f}%" if peak else "-")
        lb = (f"{r['I'] * r['O'] / peak * 1e6:.1f}" if peak else "-")
        b = r.get("blocks")
        bstr = (f"{b['block_m']},{b['block_o']},{b['block_i']},{b['split_k']},"
                f"{b['num_warps']},{b['num_stages']}" if b else "")
        sp_ref = (f"{vs_ref / r['us']:.2f}x" if vs_ref and r["impl"] != "xla-ref"
                  else "")
        sp_bf = (f"{vs_bf / r['us']:.2f}x" if vs_bf and r["impl"] != "bf16-mm"
                 else "")
        out.append(f"| {r['I']}x{r['O']} | {r['M']} | {r['x_dtype']} | "
                   f"{r['mode']} | {r['impl']} | {r['us']:.1f} | "
                   f"{r['GBps']:.0f} | {pct} | {lb} | {sp_ref} | {sp_bf} | "
                   f"{bstr} |")
    return "\n".join(out)


def _sweep_candidates(m: int, i: int, o: int, aq: bool) -> list[BlockSizes]:
    """GPU candidates for one (M, I, O, mode), most promising first: about
    two programs per SM (H100: 132 SMs), larger I steps first."""
    bm = max(16, 1 << (m - 1).bit_length())
    cands = []
    bis = (512, 256) if bm <= 16 else (256, 128)
    for bo in (32, 64, 128):
        for bi in bis:
            for split in (1, 2, 4, 8):
                if i % (split * bi) or o % bo:
                    continue
                n_prog = (o // bo) * split
                if n_prog < 96 or n_prog > 1024:
                    continue
                cands.append(BlockSizes(bm, bo, bi, split, 4, 4))
    target = 2 * 132
    cands.sort(key=lambda b: (abs(math.log2((o // b.block_o) * b.split_k /
                                             target)), -b.block_i))
    return cands


def run_sweep(args) -> dict:
    backend = _kernel_backend()
    results = {}
    configs = [(shape, m, mode) for shape in args.shapes for m in args.sweep_m
               for mode in args.modes]
    per_config = args.time_budget / max(1, len(configs))
    cache = {}
    for shape, m, mode in configs:
        i, o = (int(v) for v in shape.split("x"))
        if shape not in cache:
            cache.clear()
            r = _copies(i * o, args.sweep_total_mb, args.max_copies)
            cache[shape] = _make_weights(i, o, r)
        ws, scale = cache[shape]
        x = jax.random.normal(jax.random.PRNGKey(m), (m, i), jnp.bfloat16)
        aq = mode == "w8a8"
        best = None
        t_cfg = time.time()
        for bs in _sweep_candidates(m, i, o, aq):
            if time.time() - t_cfg > per_config:
                break
            eff = effective_block_sizes(m, i, o, jnp.bfloat16, aq,
                                        backend=backend, block_sizes=bs)
            try:
                t = _bench_op(lambda x, w, s: int8_matmul(
                    x, w, s, act_quant=aq, backend=backend,
                    interpret=args.interpret, block_sizes=eff), x, ws, scale,
                    max(5, args.iters // 2))
            except Exception as e:
                print(f"sweep fail {eff}: {type(e).__name__}: {str(e)[:200]}",
                      file=sys.stderr)
                continue
            print(f"sweep I={i} O={o} M={m} {mode} {eff} {t * 1e6:.1f}us",
                  flush=True)
            if best is None or t < best[0]:
                best = (t, eff)
        if best is not None:
            results[(tbs.m_bucket(m), i, o, aq)] = (best[1], best[0] * 1e6)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 48])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                   help="IxO weight shapes")
    p.add_argument("--dtypes", nargs="+", default=["f32", "bf16"],
                   choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=["w8a16", "w8a8"],
                   choices=["w8a16", "w8a8"])
    p.add_argument("--impls", nargs="+", default=["xla-ref", "pallas",
                                                  "bf16-mm"],
                   choices=["xla-ref", "pallas", "bf16-mm"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--total-mb", type=float, default=1200.0,
                   help="weight bytes touched per timed call (beat L2)")
    p.add_argument("--max-copies", type=int, default=64)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--interpret", action="store_true",
                   help="Pallas interpret mode (CPU smoke test only)")
    p.add_argument("--sweep", action="store_true",
                   help="sweep GPU block sizes for the small-M buckets")
    p.add_argument("--sweep-m", type=int, nargs="+", default=[1, 48])
    p.add_argument("--sweep-total-mb", type=float, default=150.0)
    p.add_argument("--time-budget", type=float, default=150.0,
                   help="seconds for --sweep")
    p.add_argument("--tuned-json", default=None,
                   help="a --sweep --json output to use instead of the table")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    fam = tbs.device_family(device.device_kind)
    header = (f"device: {device.device_kind} ({fam}), backend "
              f"{jax.default_backend()}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}")
    print(header, flush=True)

    if args.sweep:
        res = run_sweep(args)
        lines = []
        for (bucket, i, o, aq), (bs, us) in sorted(res.items()):
            lines.append(f"    ({fam!r}, {bucket}, {i}, {o}, {aq}): BlockSizes("
                         f"{bs.block_m}, {bs.block_o}, {bs.block_i}, "
                         f"split_k={bs.split_k}, num_warps={bs.num_warps}, "
                         f"num_stages={bs.num_stages}),  # {us:.1f} us")
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "device": fam, "best": [
                    dict(m_bucket=k[0], I=k[1], O=k[2], act_quant=k[3],
                         blocks=dataclasses.asdict(v[0]), us=v[1])
                    for k, v in res.items()]}, f, indent=1)
        return

    tuned = None
    if args.tuned_json:
        with open(args.tuned_json) as f:
            data = json.load(f)
        tuned = {(d["m_bucket"], d["I"], d["O"], d["act_quant"]):
                 BlockSizes(**d["blocks"]) for d in data["best"]}
    rows = run_bench(args, tuned)
    md = markdown(rows, PEAK_BW.get(fam))
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "peak_bw": PEAK_BW.get(fam), "rows": rows,
                       "markdown": md}, f, indent=1)


if __name__ == "__main__":
    main()
