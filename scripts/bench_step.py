#!/usr/bin/env python
"""Verify-step latency of Qwen3-shaped models: float vs int8 W8A16 vs int8 W8A8.

One verify step is a model forward over ``T = K + 1`` tokens per row (the last committed token
plus K drafts) against a KV cache of ``--cache-len`` slots filled to ``--fill``. For each preset
(random weights, built directly in ``--dtype`` on the default device: the float model from
``abstract_model``, the int8 model from ``quant.abstract_quantized_model`` filled with random int8
values, so no float copy of the int8 model ever exists and the two are never alive together),
each batch size and each (mode, backend) it times the jitted forward over split params
(``nnx.split`` + ``jax.jit``, the cache donated so its update is in place as in the engine's loop):
compile time separately, then the median of ``--iters`` timed calls after ``--warmup`` calls.

Columns: ``ms/step`` (median), ``tok/s`` = B*T / median, ``x fp`` = float time / this time,
``weights MB`` (bytes a forward must read: projections, norms and the LM head; for a tied model
the embedding is the LM head), ``KV MB`` (the filled part of the cache, fill + T slots, K and V),
``bound ms`` = (weights + KV bytes) / memory bandwidth (``--bandwidth-gbs``; else the nominal
peak of a known GPU/TPU; else, e.g. on CPU, the read bandwidth measured with a jitted sum over a
1 GiB array, unless ``--no-measure-bandwidth``) and ``% of bound`` = bound / median.

A model that does not fit in ``--mem-fraction`` of the free device memory (host memory on CPU)
is run with fewer layers (say so in the ``layers`` column, e.g. ``9/36``) or, with
``--no-reduce``, skipped with a message. Pallas int8 kernels are added (``backend pallas``) when
``pallas_kernels`` is importable and the backend is gpu or tpu.

Usage::

    python scripts/bench_step.py --presets qwen3-0.6b --batch 1 8 --json runs/step_cpu.json
    python scripts/bench_step.py                      # 0.6B and 8B shapes, batch 1 and 8
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from quasar_jax.bench.report import machine_info  # noqa: E402
from quasar_jax.model import quant  # noqa: E402
from quasar_jax.model.config import Qwen3Config  # noqa: E402
from quasar_jax.model.kv_cache import KVCache  # noqa: E402
from quasar_jax.model.modes import QuantMode  # noqa: E402
from quasar_jax.model.qwen3 import abstract_model  # noqa: E402

# Nominal peak memory bandwidth in GB/s by device kind substring (same figures as
# scripts/bench_kernels.py).
PEAK_BW_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "L4": 300, "A10": 600,
               "TPU v4": 1200, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765, "TPU v6": 1640}


# ----------------------------------------------------------------------------- building
def _leaf_kind(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    last = names[-1] if names else ""
    if last == "value" and len(names) > 1:  # Variable wrappers may add a trailing "value"
        names, last = names[:-1], names[-2]
    if last == "qvalue":
        return "qvalue"
    if last == "scale":
        return "qscale" if any(n.endswith("proj") or n == "lm_head" for n in names) else "norm"
    return "normal"


@functools.lru_cache(maxsize=None)
def _generator(kind: str, shape: tuple, dtype):
    def gen(key):
        if kind == "qvalue":
            return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)
        if kind == "qscale":  # dequantised weights ~ U(-0.05, 0.05), like a N(0, 0.02) kernel
            return jnp.full(shape, 0.05 / 127, dtype)
        if kind == "norm":
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return jax.jit(gen)


def random_fill(abstract):
    """Abstract (``nnx.eval_shape``) model -> (graphdef, params) with random device arrays."""
    graphdef, state = nnx.split(abstract)
    counter = [0]

    def fill(path, leaf):
        counter[0] += 1
        out = _generator(_leaf_kind(path), tuple(leaf.shape), jnp.dtype(leaf.dtype))(
            jax.random.key(counter[0]))
        return jax.block_until_ready(out)  # one leaf at a time: peak memory = the model

    return graphdef, jax.tree_util.tree_map_with_path(fill, state)


def abstract_for(cfg: Qwen3Config, dtype, mode: str, backend: str):
    if mode == "fp":
        return abstract_model(cfg, dtype)
    return quant.abstract_quantized_model(cfg, dtype, lm_head=False, backend=backend)


def nbytes(tree) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def read_bytes(cfg: Qwen3Config, abstract, b: int, t: int, dtype) -> int:
    """Parameter bytes one forward reads (untied: the embedding table is only gathered)."""
    total = nbytes(nnx.state(abstract, nnx.Param))
    if not cfg.tie_word_embeddings:
        total -= cfg.vocab_size * cfg.hidden_size * jnp.dtype(dtype).itemsize
        total += b * t * cfg.hidden_size * jnp.dtype(dtype).itemsize
    return total


def kv_bytes(cfg: Qwen3Config, b: int, slots: int, dtype) -> int:
    return 2 * cfg.num_hidden_layers * b * slots * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def free_memory_bytes() -> int | None:
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            st = dev.memory_stats()
            return int(st["bytes_limit"] - st.get("bytes_in_use", 0))
        except Exception:
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_bandwidth_gbs(gib: float = 1.0, iters: int = 5) -> float:
    """Read bandwidth of a jitted reduction over a ``gib`` GiB float32 array (median of runs)."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    del x
    return gib * 2**30 / statistics.median(times) / 1e9


def bandwidth_gbs(arg: float | None, measure: bool) -> tuple[float | None, str]:
    """(GB/s, source): ``--bandwidth-gbs``, the nominal peak of a known GPU/TPU, or measured."""
    if arg:
        return arg, "given"
    kind = jax.devices()[0].device_kind
    for key, value in PEAK_BW_GBS.items():
        if key.lower() in kind.lower():
            return float(value), f"nominal peak of {key}"
    if measure:
        return measure_bandwidth_gbs(), "measured (jitted 1 GiB float32 sum)"
    return None, "unknown"


def pallas_available() -> bool:
    return jax.default_backend() in ("gpu", "tpu") and importlib.util.find_spec("pallas_kernels") is not None


# ----------------------------------------------------------------------------- timing
def time_step(graphdef, params, cfg: Qwen3Config, mode: QuantMode, b: int, t: int,
              cache_len: int, fill: int, dtype, warmup: int, iters: int) -> dict:
    """Compile + median time of one jitted forward of [B, T] tokens against a filled cache."""
    def step(params, tokens, positions, cache):
        model = nnx.merge(graphdef, params)
        logits, new_cache = model(tokens, positions, cache, mode=mode)
        return logits, new_cache.replace(lengths=cache.lengths)  # keep the fill level

    jitted = jax.jit(step, donate_argnums=(3,))
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size, jnp.int32)
    positions = fill + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = KVCache.init(cfg, b, cache_len, dtype)
    cache = cache.replace(k=(0.5 * jax.random.normal(jax.random.key(2), cache.k.shape, jnp.float32)).astype(dtype),
                          lengths=jnp.full((b,), fill, jnp.int32))
    cache = cache.replace(v=cache.k + 0)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, tokens, positions, cache).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        logits, cache = compiled(params, tokens, positions, cache)
        jax.block_until_ready((logits, cache))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        logits, cache = compiled(params, tokens, positions, cache)
        jax.block_until_ready((logits, cache))
        times.append(time.perf_counter() - t0)
    finite = bool(jnp.all(jnp.isfinite(logits)))
    del cache, logits
    return {"compile_s": compile_s, "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times), "iters": iters,
            "logits_finite": finite}


def fit_layers(cfg: Qwen3Config, modes, backends, dtype, b_max: int, cache_len: int,
               mem_fraction: float) -> tuple[int, int | None, int]:
    """Largest layer count whose biggest model + largest cache fits; (layers, free, needed)."""
    free = free_memory_bytes()
    need_of = lambda c: max(nbytes(nnx.state(abstract_for(c, dtype, m, backends[0]), nnx.Param))
                            for m in modes) + kv_bytes(c, b_max, cache_len, dtype) \
        + b_max * 16 * c.vocab_size * 4  # logits and slack
    need = need_of(cfg)
    if free is None or need <= mem_fraction * free:
        return cfg.num_hidden_layers, free, need
    lo = 0
    for layers in range(cfg.num_hidden_layers, 0, -1):
        if need_of(_with_layers(cfg, layers)) <= mem_fraction * free:
            lo = layers
            break
    return lo, free, need


def _with_layers(cfg: Qwen3Config, layers: int) -> Qwen3Config:
    import dataclasses

    return dataclasses.replace(cfg, num_hidden_layers=layers)


# ----------------------------------------------------------------------------- main
def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    t = args.num_draft + 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("fp", "w8a16", "w8a8"):
            raise SystemExit(f"bench_step.py: error: unknown mode {m!r} (fp, w8a16, w8a8)")
    backends = args.backends.split(",") if args.backends else (
        ["xla", "pallas"] if pallas_available() else ["xla"])
    if "pallas" in backends and not pallas_available():
        print("note: pallas backend needs pallas_kernels and a gpu/tpu backend: skipped", file=sys.stderr)
        backends = [b for b in backends if b != "pallas"]
    bw, bw_source = bandwidth_gbs(args.bandwidth_gbs, not args.no_measure_bandwidth)
    print(f"# memory bandwidth for the bound: {'-' if bw is None else f'{bw:.1f} GB/s'} ({bw_source})",
          file=sys.stderr)
    rows = []
    for preset in args.presets:
        full = Qwen3Config.preset(preset)
        layers = args.layers or full.num_hidden_layers
        cfg = _with_layers(full, min(layers, full.num_hidden_layers))
        fit, free, need = fit_layers(cfg, modes, backends, dtype, max(args.batch), args.cache_len,
                                     args.mem_fraction)
        if fit < cfg.num_hidden_layers:
            msg = (f"{preset}: {cfg.num_hidden_layers} layers need ~{need / 2**30:.1f} GiB, "
                   f"{args.mem_fraction:.0%} of the free {free / 2**30:.1f} GiB is not enough")
            if args.no_reduce or fit == 0:
                print(f"SKIP {msg}", file=sys.stderr)
                rows.append({"preset": preset, "skipped": msg})
                continue
            print(f"NOTE {msg}: running {fit} of {full.num_hidden_layers} layers", file=sys.stderr)
            cfg = _with_layers(cfg, fit)
        layer_label = (f"{cfg.num_hidden_layers}" if cfg.num_hidden_layers == full.num_hidden_layers
                       else f"{cfg.num_hidden_layers}/{full.num_hidden_layers}")
        fp_ms = {}
        # one model alive at a time: float first, then the int8 one (shared by w8a16 / w8a8)
        groups = [("fp", "xla", ["fp"])] if "fp" in modes else []
        int8_modes = [m for m in modes if m != "fp"]
        groups += [("int8", be, int8_modes) for be in backends if int8_modes]
        params = None
        for kind, backend, group_modes in groups:
            build_mode = "fp" if kind == "fp" else "w8a16"
            abstract = abstract_for(cfg, dtype, build_mode, backend)
            if params is None or kind == "fp" or backend == backends[0]:
                params = None  # drop the previous model before building the next
                t0 = time.perf_counter()
                graphdef, params = random_fill(abstract)
                build_s = time.perf_counter() - t0
            else:  # same int8 arrays, other backend: only the graphdef changes
                graphdef, _ = nnx.split(abstract)
            for b in args.batch:
                wbytes = read_bytes(cfg, abstract, b, t, dtype)
                kv = kv_bytes(cfg, b, args.fill + t, dtype)
                for mode in group_modes:
                    print(f"  {preset} L={layer_label} {mode}/{backend} B={b} T={t} ...",
                          file=sys.stderr, flush=True)
                    res = time_step(graphdef, params, cfg, QuantMode.FLOAT if mode == "fp" else QuantMode(mode), b, t,
                                    args.cache_len, args.fill, dtype, args.warmup, args.iters)
                    bound_ms = 1e3 * (wbytes + kv) / (bw * 1e9) if bw else None
                    if mode == "fp":
                        fp_ms[b] = res["median_ms"]
                    rows.append({
                        "preset": preset, "layers": cfg.num_hidden_layers,
                        "layers_full": full.num_hidden_layers, "layers_label": layer_label,
                        "dtype": str(dtype), "mode": mode, "backend": "-" if mode == "fp" else backend,
                        "batch": b, "tokens_per_row": t, "cache_len": args.cache_len, "fill": args.fill,
                        **res, "tokens_per_s": b * t / (res["median_ms"] / 1e3),
                        "speedup_vs_fp": (fp_ms[b] / res["median_ms"]) if b in fp_ms else None,
                        "weight_bytes": wbytes, "kv_bytes": kv, "bandwidth_gbs": bw,
                        "bandwidth_source": bw_source,
                        "bound_ms": bound_ms,
                        "frac_of_bound": bound_ms / res["median_ms"] if bound_ms else None,
                        "build_s": build_s})
        params = None
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| shape | layers | dtype | mode | backend | B | T | cache (fill) | compile s | ms/step "
            "| tok/s | x fp | weights MB | KV MB | bound ms | % of bound |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['preset']} | skipped: {r['skipped']} |" + " |" * 14)
            continue
        out.append(
            f"| {r['preset']} | {r['layers_label']} | {r['dtype']} | {r['mode']} | {r['backend']} "
            f"| {r['batch']} | {r['tokens_per_row']} | {r['cache_len']} ({r['fill']}) "
            f"| {f(r['compile_s'], 1)} | {f(r['median_ms'])} | {f(r['tokens_per_s'], 0)} "
            f"| {f(r['speedup_vs_fp'])} | {r['weight_bytes'] / 1e6:.0f} | {r['kv_bytes'] / 1e6:.0f} "
            f"| {f(r['bound_ms'])} | {pct(r['frac_of_bound'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["qwen3-0.6b", "qwen3-8b"])
    p.add_argument("--layers", type=int, default=None, help="use only the first N layers (say so)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-draft", type=int, default=5, help="K; the step verifies T = K + 1 tokens")
    p.add_argument("--cache-len", type=int, default=1024)
    p.add_argument("--fill", type=int, default=512, help="committed cache slots before the step")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--modes", default="fp,w8a16,w8a8")
    p.add_argument("--backends", default=None,
                   help="int8 backends, comma separated (default: xla, plus pallas on gpu/tpu)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the lower bound (default: nominal peak of known "
                        "GPUs/TPUs, else measured with a jitted 1 GiB reduction)")
    p.add_argument("--no-measure-bandwidth", action="store_true",
                   help="leave the bound empty when the bandwidth is not known")
    p.add_argument("--mem-fraction", type=float, default=0.8,
                   help="use at most this fraction of the free memory (else fewer layers)")
    p.add_argument("--no-reduce", action="store_true", help="skip a model that does not fit instead")
    p.add_argument("--json", default=None, help="write {machine, args, rows} here")
    args = p.parse_args(argv)
    if args.fill + args.num_draft + 1 > args.cache_len:
        p.error(f"--fill {args.fill} + K+1 does not fit in --cache-len {args.cache_len}")
    info = machine_info()
    print(f"# verify step: {info['device']} ({info['backend']}), {info['cores_available']} cores, "
          f"jax {info['jax']}", file=sys.stderr)
    rows = run(args)
    order = {m: i for i, m in enumerate(["fp", "w8a16", "w8a8"])}
    rows.sort(key=lambda r: (args.presets.index(r["preset"]), r.get("batch", 0),
                             r.get("backend", ""), order.get(r.get("mode"), 9)))
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows,
                                               "markdown": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
