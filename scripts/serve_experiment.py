"""Load generator for ``quasar_jax.serve``: throughput and latency per decoding mode and mesh.

For each mesh (``--mesh 1 model=2 data=2,model=2``; without accelerators the script asks XLA for
``--devices`` fake CPU devices, which share the machine's cores: their figures show the overhead
of partitioning, not a speedup) and each mode (``MODES``: drafter, verifier and ``--speculation``
of the server; ``*-auto`` switches draft length by load and acceptance, the others are fixed),
the script starts the server in this process (uvicorn on 127.0.0.1, a free port) and sends
Spec-Bench prompts over HTTP with an async client (streaming ``/v1/completions``, greedy):

* ``--concurrency 1 4 16 64``: that many requests in flight at all times (``--requests`` of them
  per level, the same requests for every mode);
* ``--rates 0.5 2``: Poisson arrivals at these rates (requests/s);
* ``--offline``: every request at once, continuous batching (the server) against static batching
  (``Engine.generate`` on consecutive groups of ``--slots`` requests; a group runs until its last
  row is done, with the group's largest budget, each row then cut to its own).

Per run: throughput (completion tokens / makespan), time to first token and time per output
token p50/p90/p99 (client side), tau, slot occupancy and the chunks run per draft length K (from
the server's /metrics), the machine's load averages before and after. Budgets are drawn
uniformly from [--min-tokens, --max-tokens] (seeded), so requests finish at different times.
Writes ``OUT.json``, ``OUT.md`` (the tables, and auto against the better of AR and fixed K) and
``OUT.png`` (throughput against concurrency, one panel per mesh).

    python scripts/serve_experiment.py --modes ar sd sd-auto --concurrency 1 4 16 64 \\
        --requests 8 16 32 64 --questions ../shared/specbench/*.jsonl --out docs/results/serving_auto_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODES = {  # name -> (drafter, verifier, speculation: off | fixed (K = --num-draft) | auto)
    "ar": ("none", "float", "off"), "sd": ("ngram", "float", "fixed"), "sd-k2": ("ngram", "float", 2),
    "sd-auto": ("ngram", "float", "auto"), "quasar-ar": ("none", "w8a16", "off"), "quasar": ("ngram", "w8a16", "fixed"),
    "quasar-k2": ("ngram", "w8a16", 2), "quasar-auto": ("ngram", "w8a16", "auto"), "quasar-w8a8": ("ngram", "w8a8", "fixed"),
    "qspec": ("qspec", "w8a16", "fixed"),
    # S4C (--drafter s4c, C = 1 n-gram candidate): the heads' tree forced, and auto over {AR, chain, tree};
    # s4c-auto-flat: auto with every program's calibrated step time set to AR's (an accelerator's verify,
    # flat in its token count: what the policy would choose there, measured on this machine's acceptance)
    "s4c": ("s4c", "float", "fixed"), "s4c-auto": ("s4c", "float", "auto"), "s4c-auto-flat": ("s4c", "float", "auto"),
}
FAMILIES = {"float": ("ar", ("sd-k2", "sd"), "sd-auto"),  # AR, every fixed K, auto
            "w8a16": ("quasar-ar", ("quasar-k2", "quasar"), "quasar-auto"),
            "s4c": ("ar", ("sd", "s4c"), "s4c-auto")}  # float; fixed: the n-gram chain and the heads' tree


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["ar", "quasar"])
    p.add_argument("--mesh", nargs="+", default=["1"], help="meshes ('1' = one device), e.g. model=2 data=2,model=2")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices when a mesh needs several")
    p.add_argument("--concurrency", nargs="*", type=int, default=[1, 4, 16])
    p.add_argument("--requests", nargs="*", type=int, default=None,
                   help="requests per concurrency level (default: --num-requests for each)")
    p.add_argument("--rates", nargs="*", type=float, default=[])
    p.add_argument("--offline", action="store_true", help="also compare static and continuous batching")
    p.add_argument("--questions", nargs="+", default=sorted(glob.glob("../shared/specbench/*.jsonl")))
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of each load (the tables show the median)")
    p.add_argument("--pad-heads", type=int, default=None,
                   help="serve the model with its query heads zero-padded to this many per layer (the same "
                        "function, e.g. the demo model's 6 heads as 8, so that model=4 divides them)")
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {os.cpu_count()} cores")
    p.add_argument("--kv-layout", choices=["paged", "dense"], default=None,
                   help="the servers' KV layout (default: the server's: paged on one device)")
    p.add_argument("--out", default="runs/serving")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge these reports (their meshes and modes) into --out's JSON, table and plot")
    args = p.parse_args(argv)
    if args.requests is not None and len(args.requests) != len(args.concurrency):
        p.error("--requests needs one count per --concurrency level")
    args.mesh = [None if m in ("1", "none") else m for m in args.mesh]
    return args


# ----------------------------------------------------------------------------- workload
def make_requests(args, tokenizer) -> list[dict]:
    from quasar_jax.cli.prompts import load_questions

    rng = random.Random(args.seed)
    questions = load_questions(args.questions)
    rng.shuffle(questions)
    reqs = []
    for q in questions:
        budget = rng.randint(args.min_tokens, args.max_tokens)
        n = len(tokenizer(q.text)["input_ids"])
        if n + budget <= args.max_len:
            reqs.append({"prompt": q.text, "max_tokens": budget, "prompt_tokens": n})
        if len(reqs) == args.num_requests:
            break
    return reqs


async def one_request(client: httpx.AsyncClient, model: str, req: dict) -> dict:
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            first = first or now
            last = now
            usage = chunk.get("usage") or usage
    n = usage["completion_tokens"]
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "latency": last - t0,
            "tokens": n, "steps": usage["verify_steps"]}


async def run_load(url: str, model: str, reqs: list[dict], *, concurrency: int | None = None,
                   rate: float | None = None, seed: int = 0) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(reqs) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if rate is None:
            sem = asyncio.Semaphore(concurrency)

            async def gated(r):
                async with sem:
                    return await one_request(client, model, r)
            results = await asyncio.gather(*(gated(r) for r in reqs))
        else:
            rng = np.random.default_rng(seed)
            tasks = []
            for r in reqs:
                tasks.append(asyncio.create_task(one_request(client, model, r)))
                await asyncio.sleep(rng.exponential(1.0 / rate))
            results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if "program" in s.labels:  # quasar_chunks_total{chain 5}
                out[f"{s.name}{{{s.labels['program']} {s.labels['k']}}}"] = s.value
            elif not s.labels or set(s.labels) <= {"outcome"}:
                out[s.name + "".join(f"{{{v}}}" for v in s.labels.values())] = s.value
    return out


def summarize(results: list[dict], wall: float, before: dict, after: dict, slots: int) -> dict:
    def pct(key):
        xs = [r[key] for r in results if r[key] is not None]
        return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)} if xs else {}

    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    tokens = sum(r["tokens"] for r in results)
    iters = d.get("quasar_loop_iterations_total", 0)
    chunks = {k[len("quasar_chunks_total{"):-1]: int(v) for k, v in d.items()
              if k.startswith("quasar_chunks_total{") and v}  # "chain 5": chunks of the K = 5 chain
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_s": pct("ttft"), "tpot_s": pct("tpot"), "latency_s": pct("latency"),
            "tau": d.get("quasar_accepted_length_sum", 0) / max(d.get("quasar_accepted_length_count", 0), 1),
            "slot_occupancy": d.get("quasar_busy_slot_iterations_total", 0) / max(iters * slots, 1),
            "chunks_by_k": chunks, "alpha_end": after.get("quasar_acceptance_alpha")}


def static_batching(model, tokenizer, reqs, args, drafter, verifier, stop_ids) -> dict:
    """``Engine.generate`` on consecutive groups of ``slots`` requests (compile excluded)."""
    import quasar_jax as qj

    engine = qj.Engine(model)
    done_at, tokens, wall, t = [], 0, 0.0, 0.0
    for start in range(0, len(reqs), args.slots):
        group = reqs[start:start + args.slots]
        ids = [tokenizer(r["prompt"])["input_ids"] for r in group]
        cfg = qj.GenerationConfig(max_new_tokens=max(r["max_tokens"] for r in group), drafter=drafter,
                                  num_draft=args.num_draft, verifier=verifier, stop_ids=stop_ids,
                                  max_len=args.max_len)
        engine.generate(ids, cfg)  # compile (and warm) this group's shapes
        res = engine.generate(ids, cfg)
        t += res.batch_stats.wall_s
        wall += res.batch_stats.wall_s
        for r, out in zip(group, res.tokens):
            tokens += min(len(out), r["max_tokens"])
            done_at.append(t)
    lat = np.asarray(done_at)
    return {"requests": len(reqs), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_s": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}}


def pad_query_heads(model, heads: int):
    """The same function with ``heads`` query heads: each kv group's R query heads get zero
    ``q_proj`` columns and zero ``o_proj`` rows appended (a zero-output head: its attention output
    is multiplied by zero rows). Float models only (quantise afterwards)."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from quasar_jax.model.qwen3 import Qwen3

    cfg = model.config
    h, g, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if heads % g or heads < h:
        raise ValueError(f"--pad-heads {heads}: a multiple of the {g} kv heads, at least {h}")
    r, r2 = h // g, heads // g
    padded = Qwen3(dataclasses.replace(cfg, num_attention_heads=heads), dtype=model.dtype, rngs=nnx.Rngs(0))
    same = nnx.state(model, lambda path, _: not {"q_proj", "o_proj"} & set(path))  # every other param
    nnx.update(padded, same)
    for old, new in zip(model.layers, padded.layers):
        q = old.self_attn.q_proj.kernel[...].reshape(cfg.hidden_size, g, r, e)  # [D, G, R, E]
        o = old.self_attn.o_proj.kernel[...].reshape(g, r, e, cfg.hidden_size)  # [G, R, E, D]
        new.self_attn.q_proj.kernel = nnx.Param(jnp.pad(q, ((0, 0), (0, 0), (0, r2 - r), (0, 0))).reshape(cfg.hidden_size, -1))
        new.self_attn.o_proj.kernel = nnx.Param(jnp.pad(o, ((0, 0), (0, r2 - r), (0, 0), (0, 0))).reshape(-1, cfg.hidden_size))
    return padded


# ----------------------------------------------------------------------------- driver
def run_mode(mode: str, mesh, args, reqs, tokenizer, model_dir, stop_ids) -> dict:
    import jax.numpy as jnp

    from quasar_jax import sharding
    from quasar_jax.serving.server import ServeConfig, ServerThread, build
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.speculative.heads import resolve_heads
    from quasar_jax.weights.loading import load_model

    drafter_name, verifier, speculation = MODES[mode]
    heads = resolve_heads(None, model_dir, num_draft=args.num_draft) if drafter_name == "s4c" else None
    drafter = make_drafter(drafter_name, num_draft=args.num_draft, heads=heads)
    speculation = {"off": 0, "fixed": args.num_draft}.get(speculation, speculation)
    mesh_obj = sharding.make_mesh(mesh)
    if args.pad_heads:
        from quasar_jax.model.quant import quantize_model

        model = pad_query_heads(load_model(model_dir, dtype=jnp.float32), args.pad_heads)
        model = quantize_model(model) if verifier != "float" else model  # placed on the mesh by the server
    else:
        model = load_model(model_dir, dtype=jnp.float32, int8=verifier != "float", mesh=mesh_obj)
    cfg = ServeConfig(drafter=drafter, verifier=verifier, slots=args.slots, max_len=args.max_len,
                      chunk_steps=args.chunk_steps, max_queue=max(64, len(reqs)), speculation=speculation,
                      mesh=mesh_obj, kv_layout=args.kv_layout)
    t0 = time.perf_counter()
    app, _, scheduler = build(model, tokenizer, cfg, model_name="m", stop_ids=stop_ids)
    compile_s = time.perf_counter() - t0
    if mode.endswith("-flat"):  # every program as fast as AR per step (see MODES)
        cal = scheduler.policy.calibration
        scheduler.policy.calibration = [cal[0]] * len(cal)
    server = ServerThread(app).start()
    out = {"mode": mode, "mesh": mesh or "1", "drafter": drafter_name, "verifier": verifier,
           "speculation": speculation, "programs_k": list(scheduler.engine.ks), "compile_s": compile_s,
           "calibration_s_per_step": getattr(scheduler.policy, "calibration", None), "runs": []}
    try:
        asyncio.run(run_load(server.url, "m", reqs[:2], concurrency=2))  # warm-up
        counts = args.requests or [len(reqs)] * len(args.concurrency)
        loads = [("concurrency", c, n) for c, n in zip(args.concurrency, counts)]
        loads += [("rate", r, len(reqs)) for r in args.rates]
        if args.offline:
            loads.append(("offline", len(reqs), len(reqs)))
        for repeat in range(args.repeats):
            for kind, value, n in loads:
                before, load0 = scrape(server.url), os.getloadavg()
                results, wall = asyncio.run(run_load(
                    server.url, "m", reqs[:n], concurrency=value if kind != "rate" else None,
                    rate=value if kind == "rate" else None, seed=args.seed))
                row = {"load": kind, "value": value, "repeat": repeat,
                       **summarize(results, wall, before, scrape(server.url), args.slots),
                       "loadavg_before": load0, "loadavg_after": os.getloadavg()}
                print(json.dumps({"mesh": out["mesh"], "mode": mode, **row}), flush=True)
                out["runs"].append(row)
    finally:
        server.stop()
        scheduler.stop()
    if args.offline and mesh is None:
        row = {"load": "static", "value": len(reqs),
               **static_batching(model, tokenizer, reqs, args, drafter_name, verifier, stop_ids)}
        print(json.dumps({"mode": mode, **row}), flush=True)
        out["runs"].append(row)
    return out


def median_runs(runs: list[dict]) -> list[dict]:
    """One row per load: the repeat with the median tokens/s, with the spread of all repeats."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["load"], r["value"]), []).append(r)
    out = []
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: r["tokens_per_s"])
        out.append({**rows[(len(rows) - 1) // 2], "spread": [rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]],
                    "repeats": len(rows)})
    return out


def _program_order(item) -> tuple:
    kind, _, k = item[0].rpartition(" ")
    return ({"ar": 0, "chain": 1, "tree": 2}.get(kind, 3), int(k))


def _ms(d: dict, q: str) -> str:
    return f"{1000 * d[q]:.0f}" if d and q in d else "-"


def _load_name(r: dict) -> str:
    return {"concurrency": f"concurrency {r['value']}", "rate": f"Poisson {r['value']}/s",
            "offline": f"offline, continuous ({r['value']})", "static": f"offline, static ({r['value']})"}[r["load"]]


def comparison_rows(report: dict) -> list[dict]:
    """Per mesh, verifier family and concurrency: auto against AR and EVERY fixed K that ran."""
    rows = []
    by = {(m["mesh"], m["mode"]): {r["value"]: r for r in median_runs(m["runs"]) if r["load"] == "concurrency"}
          for m in report["modes"]}
    for mesh in dict.fromkeys(m["mesh"] for m in report["modes"]):
        for family, (ar, fixed, auto) in FAMILIES.items():
            fixed = [k for k in fixed if (mesh, k) in by]
            if not fixed or not all((mesh, x) in by for x in (ar, auto)):
                continue
            for c in sorted(by[(mesh, auto)]):
                names = [ar, *fixed, auto]
                if not all(c in by[(mesh, name)] for name in names):
                    continue
                tps = {name: by[(mesh, name)][c]["tokens_per_s"] for name in names}
                best = max(tps[ar], *(tps[k] for k in fixed))
                rows.append({"mesh": mesh, "verifier": family, "concurrency": c, "ar": tps[ar],
                             "fixed": {k: tps[k] for k in fixed}, "auto": tps[auto],
                             "auto_vs_best": tps[auto] / best,
                             "auto_vs": {name: tps[auto] / tps[name] for name in names[:-1]},
                             "spread": {name: by[(mesh, name)][c]["spread"] for name in names},
                             "auto_chunks_by_k": by[(mesh, auto)][c]["chunks_by_k"]})
    return rows


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report["comparison"] = comparison_rows(report)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Machine: {report['machine']}; model {report['model']}, float32 weights (int8 for w8a16); "
             f"{report['slots']} slots, cache {report['max_len']}, K = {report['num_draft']}, "
             f"N = {report['chunk_steps']}; budgets {report['budgets']} tokens; greedy"
             + (f"; query heads zero-padded to {report['pad_heads']} (--pad-heads)" if report.get("pad_heads") else "")
             + ("; meshes of fake CPU devices share the same cores: the figures show the overhead of partitioning, "
                "not a speedup" if any(m["mesh"] != "1" for m in report["modes"]) else "") + ".", "",
             "| mesh | mode | load | tok/s (min-max) | TTFT p50/p99 ms | TPOT p50/p99 ms | tau | occupancy | chunks by K |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | --- |"]
    for m in report["modes"]:
        for r in median_runs(m["runs"]):
            ttft, tpot = r.get("ttft_s", {}), r.get("tpot_s", {})
            chunks = " ".join(f"{k}:{v}" for k, v in sorted(r.get("chunks_by_k", {}).items(), key=_program_order))
            spread = f" ({r['spread'][0]:.0f}-{r['spread'][1]:.0f})" if r["repeats"] > 1 else ""
            lines.append(f"| {m['mesh']} | {m['mode']} | {_load_name(r)} | {r['tokens_per_s']:.1f}{spread} | "
                         f"{_ms(ttft, 'p50')}/{_ms(ttft, 'p99')} | {_ms(tpot, 'p50')}/{_ms(tpot, 'p99')} | "
                         f"{r.get('tau', float('nan')):.2f} | {r.get('slot_occupancy', float('nan')):.2f} | {chunks} |")
    if report["comparison"]:
        lines += ["", "auto against AR and every fixed K (same verifier, same requests, tokens/s, median of "
                  f"{report.get('repeats', 1)} runs; auto / best: against the best of all of them):", "",
                  "| mesh | verifier | concurrency | AR | fixed K | auto | auto / best | auto's chunks by K |",
                  "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |"]
        for c in report["comparison"]:
            chunks = " ".join(f"{k}:{v}" for k, v in sorted(c["auto_chunks_by_k"].items(), key=_program_order))
            fixed = ", ".join(f"{k} {v:.1f}" for k, v in c["fixed"].items())
            lines.append(f"| {c['mesh']} | {c['verifier']} | {c['concurrency']} | {c['ar']:.1f} | {fixed} | "
                         f"{c['auto']:.1f} | {c['auto_vs_best']:.2f} | {chunks} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, out.with_suffix(".png"))


def plot(report: dict, path: Path) -> None:
    """Per mesh: tokens/s against concurrency, relative to plain AR of the same verifier when it ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ar_of = {mode: "ar" if verifier == "float" else "quasar-ar" for mode, (_, verifier, _) in MODES.items()}
    curves = {(m["mesh"], m["mode"]): dict(sorted((r["value"], r["tokens_per_s"]) for r in median_runs(m["runs"])
                                                  if r["load"] == "concurrency")) for m in report["modes"]}
    relative = all((mesh, ar_of.get(mode)) in curves for mesh, mode in curves)
    meshes = list(dict.fromkeys(mesh for mesh, _ in curves))
    fig, axes = plt.subplots(1, len(meshes), figsize=(4.2 * len(meshes), 3.8), squeeze=False)
    for ax, mesh in zip(axes[0], meshes):
        for (m_mesh, mode), pts in curves.items():
            if m_mesh != mesh or not pts:
                continue
            base = curves[(mesh, ar_of[mode])] if relative else {c: 1.0 for c in pts}
            xs = [c for c in pts if c in base]
            ax.plot(xs, [pts[c] / base[c] for c in xs], marker="o", label=mode,
                    linestyle="--" if mode.endswith("auto") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("tokens/s relative to AR (same verifier)" if relative else "completion tokens/s")
        ax.set_title(f"mesh {mesh}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"quasar_jax.serve, {report['model']} model, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = parse_args(argv)
    if args.render:
        reports = [json.loads(Path(f).read_text()) for f in args.render]
        report = {**reports[0], "modes": [m for r in reports for m in r["modes"]],
                  "parts": [{k: v for k, v in r.items() if k not in ("modes", "comparison")} for r in reports]}
        write_outputs(report, Path(args.out))
        print(Path(args.out).with_suffix(".md").read_text())
        return 0
    if any(m is not None for m in args.mesh) and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.weights.loading import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = stop_ids_of(tokenizer, model_dir)
    reqs = make_requests(args, tokenizer)
    report = {"machine": args.machine, "model": args.model, "date": time.strftime("%Y-%m-%d"),
              "num_requests": len(reqs), "requests_per_level": args.requests, "budgets": [args.min_tokens, args.max_tokens],
              "slots": args.slots, "max_len": args.max_len, "num_draft": args.num_draft,
              "chunk_steps": args.chunk_steps, "questions": [Path(q).name for q in args.questions],
              "pad_heads": args.pad_heads, "repeats": args.repeats,
              "loadavg_start": os.getloadavg(), "modes": []}
    for mesh in args.mesh:
        for mode in args.modes:
            report["modes"].append(run_mode(mode, mesh, args, reqs, tokenizer, model_dir, stop_ids))
            write_outputs(report, Path(args.out))
    report["loadavg_end"] = os.getloadavg()
    write_outputs(report, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
