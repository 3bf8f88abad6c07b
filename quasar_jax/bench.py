"""Spec-Bench-style benchmark: acceptance (tau), speedup, exact match, float-vs-int8 fidelity.

    python -m quasar_jax.bench --model demo --questions /work/shared/specbench/*.jsonl \\
        --num-prompts 3 --max-new-tokens 64 --out runs/bench

Every mode runs on the same prompt ids in one process; results go to ``DIR/results.json``,
``DIR/results.md``, ``DIR/plot.png`` and ``DIR/outputs.jsonl`` (generated ids and text per
prompt and mode).

Modes (``--modes``, comma separated):

===============  ==========================================================================
``ar-fp``        autoregressive (drafter none), float model: the speed baseline
``ar-int8``      autoregressive, int8 model, W8A16 (weight-only) matmuls
``ar-w8a8``      autoregressive, int8 model, W8A8 matmuls (the exact-match reference of
                 ``quasar-w8a8``; added automatically when that mode is requested)
``sd-fp``        n-gram prompt-lookup drafting + float verifier
``quasar-w8a16`` n-gram drafting + int8 W8A16 verifier (Quasar)
``quasar-w8a8``  n-gram drafting + int8 W8A8 verifier
``qspec``        W8A8 drafting + W8A16 verifying of the same int8 weights (QSpec)
``hf-ar``        transformers ``generate`` greedy, torch float32 on CPU, batch 1
``hf-pld``       transformers ``generate(prompt_lookup_num_tokens=K)`` (prompt lookup decoding)
===============  ==========================================================================

``ar-fp`` is always run (it is the speed and fidelity baseline); ``ar-int8`` is added when
``quasar-w8a16`` or ``qspec`` is requested and ``ar-w8a8`` when ``quasar-w8a8`` is: runs added
that way carry ``"auto_added": true``. The float model is loaded once; the int8 model is
quantised once (``quantize_model(..., mode="w8a16")``; the activation mode is chosen per call) and
shared by every int8 mode. One ``Engine`` per model: each (mode, batch, prompt bucket) program
compiles once, ahead of time; its compile time is reported as ``compile_s`` (summed over the
shape buckets of the mode) and never counted in the timed wall. ``--prompt-bucket N`` pads
prompts to a multiple of N tokens instead of the engine's 32 (fewer programs to compile, a little
more prefill; every JAX mode pads alike). Before timing, every (mode, shape bucket) gets one untimed warm-up generate.
Then ``--repeats`` timed rounds run every mode over every batch (modes interleaved round by round,
so slow drift of a shared machine hits all modes alike); each batch's wall time is the median
over the rounds.

Prompts: Spec-Bench jsonl rows ``{"question_id", "category", "turns"}``; the first turn is the
prompt, a missing or empty category is replaced by the file's stem (``alpaca.jsonl`` ->
``alpaca``). ``--num-prompts N`` keeps the first N prompts *of each category* (in the order of the
files given, then of the lines); a prompt text seen before (the same question in two files) is
used once. Batches (``--batch-size``) never mix categories. HF modes always run batch 1.

Counting, identical for every mode: a prompt's output is its new token ids (the prompt excluded),
cut after the first stop id (included when emitted) and at ``--max-new-tokens``. Metrics per mode,
per category and overall (pooled over prompts, not averaged over per-prompt ratios):

* ``tau`` = new tokens / verify steps (each step emits the accepted drafts plus the bonus token;
  1.0 for autoregressive decoding). For ``qspec`` only verify passes count: its K single-token
  W8A8 draft forwards per step are extra work that ``tau`` does not show (tokens/s does). For HF
  modes the steps are the model's forward calls counted with a forward hook (the first one is the
  prefill, which emits the first token, like our first verify step), so ``tau`` is 1.0 for
  ``hf-ar`` and the mean tokens per forward for ``hf-pld``.
* ``tokens_per_s`` = new tokens / timed wall; the wall of a batch is the whole
  ``Engine.generate`` (or ``model.generate``) call, median over the repeats.
* ``speedup_vs_ar_fp`` = ``tokens_per_s`` / ``tokens_per_s`` of ``ar-fp`` on the same prompts.
* ``exact_match`` = fraction of prompts whose output ids equal those of the mode's lossless
  reference (``reference``): ``ar-fp`` for ``sd-fp``, ``hf-ar``, ``hf-pld`` (and itself);
  ``ar-int8`` for ``quasar-w8a16`` and ``qspec`` (both verify with W8A16); ``ar-w8a8`` for
  ``quasar-w8a8``. Under greedy decoding speculative modes must score 1.0; a lower value means
  a numerical difference between the K+1-token verify pass and single-token decoding (or, for
  HF modes, between torch and XLA). ``exact_match_vs_ar_fp`` compares every mode with ``ar-fp``
  (for int8 modes that is the quantisation drift, not a correctness check).
* ``fidelity`` (per activation mode w8a16 / w8a8, see :func:`fidelity`): along the ``ar-fp``
  greedy outputs, teacher-forced, the top-1 agreement of int8 vs float next-token predictions,
  the mean KL(p_fp || p_int8) per position, and the mean common prefix (in tokens) of the int8
  autoregressive output and the ``ar-fp`` output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from quasar_jax.cli import EXIT_USAGE, OneLineParser, float_in, positive_int
from quasar_jax.engine import round_up
from quasar_jax.fidelity import common_prefix, fidelity, pool_fidelity, ratio
from quasar_jax.prompts import Question, load_questions

# ----------------------------------------------------------------------------- modes
MODES = ("ar-fp", "ar-int8", "ar-w8a8", "sd-fp", "quasar-w8a16", "quasar-w8a8", "qspec", "hf-ar",
         "hf-pld")
DEFAULT_MODES = ("ar-fp", "ar-int8", "sd-fp", "quasar-w8a16", "quasar-w8a8", "qspec", "hf-ar",
                 "hf-pld")
BASELINE = "ar-fp"


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    name: str
    kind: str  # "jax" | "hf"
    model: str  # "fp" | "int8" | "hf"
    drafter: str  # none | ngram | qspec (hf: none | pld)
    verifier: str  # fp | w8a16 | w8a8
    reference: str  # the AR mode whose outputs this mode must reproduce (greedy)


SPECS = {s.name: s for s in (
    ModeSpec("ar-fp", "jax", "fp", "none", "fp", "ar-fp"),
    ModeSpec("ar-int8", "jax", "int8", "none", "w8a16", "ar-int8"),
    ModeSpec("ar-w8a8", "jax", "int8", "none", "w8a8", "ar-w8a8"),
    ModeSpec("sd-fp", "jax", "fp", "ngram", "fp", "ar-fp"),
    ModeSpec("quasar-w8a16", "jax", "int8", "ngram", "w8a16", "ar-int8"),
    ModeSpec("quasar-w8a8", "jax", "int8", "ngram", "w8a8", "ar-w8a8"),
    ModeSpec("qspec", "jax", "int8", "qspec", "w8a16", "ar-int8"),
    ModeSpec("hf-ar", "hf", "hf", "none", "fp", "ar-fp"),
    ModeSpec("hf-pld", "hf", "hf", "pld", "fp", "ar-fp"),
)}
# int8 activation mode -> the autoregressive run that shows its greedy trajectory
AR_OF_QUANT_MODE = {"w8a16": "ar-int8", "w8a8": "ar-w8a8"}


def resolve_modes(requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """Requested modes -> (modes to run in canonical order, the ones added as references)."""
    unknown = [m for m in requested if m not in SPECS]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if not requested:
        raise ValueError("no modes given")
    need = set(requested) | {BASELINE}
    need |= {SPECS[m].reference for m in list(need)}
    added = [m for m in MODES if m in need and m not in requested]
    return [m for m in MODES if m in need], added


# ----------------------------------------------------------------------------- prompts
# ----------------------------------------------------------------------------- measurements
@dataclasses.dataclass
class Batch:
    category: str
    rows: list[int]  # prompt indices
    walls: list[float] = dataclasses.field(default_factory=list)  # one per timed repeat

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls)


@dataclasses.dataclass
class ModeRun:
    """What one mode produced: outputs aligned with the prompt list, steps, timed batches."""

    mode: str
    outputs: list[list[int] | None]
    steps: list[int | None]  # verify steps (forward calls for HF) per prompt; None = unknown
    batches: list[Batch]
    compile_s: float | None = None
    reference: str | None = None
    auto_added: bool = False
    deterministic: bool = True  # every repeat produced the same ids


def truncate_output(ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Cut after the first stop id (kept) and at ``max_new_tokens``: the one counting rule."""
    out = []
    stop = set(int(s) for s in stop_ids)
    for t in list(ids)[:max_new_tokens]:
        out.append(int(t))
        if int(t) in stop:
            break
    return out


def _group_metrics(run: ModeRun, rows: list[int], batches: list[Batch], runs: dict[str, ModeRun]) -> dict:
    new = sum(len(run.outputs[i]) for i in rows)
    steps = None if any(run.steps[i] is None for i in rows) else sum(run.steps[i] for i in rows)
    wall = sum(b.wall_s for b in batches) if batches and all(b.walls for b in batches) else None
    out = {"num_prompts": len(rows), "new_tokens": new, "verify_steps": steps,
           "tau": ratio(new, steps), "wall_s": wall, "tokens_per_s": ratio(new, wall)}
    for key, ref_name in (("exact_match", run.reference), ("exact_match_vs_ar_fp", BASELINE)):
        ref = runs.get(ref_name) if ref_name else None
        out[key] = (None if ref is None or not rows else
                    sum(run.outputs[i] == ref.outputs[i] for i in rows) / len(rows))
    ref = runs.get(run.reference) if run.reference else None
    out["mean_common_prefix_vs_reference"] = (
        None if ref is None or not rows else
        sum(common_prefix(run.outputs[i], ref.outputs[i]) for i in rows) / len(rows))
    return out


def summarize(runs: dict[str, ModeRun], categories: Sequence[str]) -> dict:
    """Per mode ``{"overall": {...}, "categories": {cat: {...}}}`` from the raw runs.

    ``categories[i]`` is prompt i's category. tau, tokens/s and exact match are pooled over the
    prompts of the group; ``speedup_vs_ar_fp`` divides by ``ar-fp``'s tokens/s on the same group.
    """
    cats = list(dict.fromkeys(categories))
    result = {}
    for name, run in runs.items():
        if len(run.outputs) != len(categories) or len(run.steps) != len(categories):
            raise ValueError(f"mode {name}: {len(run.outputs)} outputs for {len(categories)} prompts")
        overall = _group_metrics(run, list(range(len(categories))), run.batches, runs)
        per_cat = {}
        for c in cats:
            rows = [i for i, ci in enumerate(categories) if ci == c]
            per_cat[c] = _group_metrics(run, rows, [b for b in run.batches if b.category == c], runs)
        totals = [sum(b.walls[r] for b in run.batches) for r in range(min((len(b.walls) for b in run.batches), default=0))]
        overall.update(compile_s=run.compile_s, reference=run.reference, auto_added=run.auto_added,
                       deterministic=run.deterministic,
                       wall_s_min_repeat=min(totals) if totals else None,
                       wall_s_max_repeat=max(totals) if totals else None)
        result[name] = {"overall": overall, "categories": per_cat}
    base = result.get(BASELINE)
    for name, res in result.items():
        groups = [(res["overall"], base and base["overall"])]
        groups += [(res["categories"][c], base and base["categories"][c]) for c in cats]
        for g, b in groups:
            g["speedup_vs_ar_fp"] = ratio(g["tokens_per_s"], b["tokens_per_s"] if b else None)
    return result


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict:
    import jax

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["cores_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores_available"] = os.cpu_count()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    devices = jax.devices()
    info.update(jax=jax.__version__, backend=jax.default_backend(),
                devices=[f"{d.platform}:{d.device_kind}" for d in devices],
                gpu=next((d.device_kind for d in devices if d.platform != "cpu"), None))
    for mod in ("jaxlib", "flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # pragma: no cover
        pass
    return info


# ----------------------------------------------------------------------------- running
def _make_batches(categories: Sequence[str], batch_size: int) -> list[Batch]:
    batches = []
    for cat in dict.fromkeys(categories):
        rows = [i for i, c in enumerate(categories) if c == cat]
        for s in range(0, len(rows), batch_size):
            batches.append(Batch(cat, rows[s:s + batch_size]))
    return batches


def _shape_key(prompt_ids, rows, bucket: int) -> tuple:
    longest = max(len(prompt_ids[i]) for i in rows)
    return len(rows), round_up(longest, bucket)


class JaxRunner:
    def __init__(self, spec: ModeSpec, engine, config):
        self.spec, self.engine, self.config = spec, engine, config
        self.compile_s = 0.0

    def __call__(self, prompts: list[list[int]]):
        t0 = time.perf_counter()
        res = self.engine.generate(prompts, self.config)
        wall = time.perf_counter() - t0
        self.compile_s += res.batch_stats["compile_s"]
        return res.tokens, [s["verify_steps"] for s in res.stats], wall - res.batch_stats["compile_s"]


class HFRunner:
    """transformers ``generate`` one prompt at a time; forward calls are counted with a hook."""

    def __init__(self, spec: ModeSpec, model, gen_config):
        self.spec, self.model, self.gen_config = spec, model, gen_config
        self.compile_s = None
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def __call__(self, prompts: list[list[int]]):
        import torch

        tokens, steps, wall = [], [], 0.0
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.long)
            before = self.calls
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                          generation_config=self.gen_config)
            wall += time.perf_counter() - t0
            tokens.append(out[0, len(p):].tolist())
            steps.append(self.calls - before)
        return tokens, steps, wall


def _hf_generation_config(args, spec: ModeSpec, stop_ids, pad_id):
    from transformers import GenerationConfig as HFGenerationConfig

    kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=list(stop_ids) or None,
              pad_token_id=pad_id, num_beams=1)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_k=None, top_p=None)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if spec.drafter == "pld":
        kw.update(prompt_lookup_num_tokens=args.num_draft, max_matching_ngram_size=args.ngram_max)
    return HFGenerationConfig(**kw)


def _load_hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # generate() falls back to the model's own generation config for unset fields (eos!): the
    # benchmark's GenerationConfig must be the only source, so neutralise the model's one.
    model.generation_config.eos_token_id = None
    return model


def run_benchmark(args, progress: bool = True) -> dict:
    """Run every mode on the questions of ``args`` -> results and raw outputs (see ``main``)."""
    load_before = _loadavg()
    from quasar_jax.engine import PROMPT_BUCKET

    bucket = args.prompt_bucket or PROMPT_BUCKET
    bundle = _run_benchmark(args, progress, bucket)
    bundle["results"]["machine"]["loadavg_1m_before"] = load_before
    bundle["results"]["machine"]["loadavg_1m_after"] = _loadavg()
    bundle["results"]["config"]["prompt_bucket_used"] = bucket
    return bundle


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _run_benchmark(args, progress: bool, bucket: int) -> dict:
    import jax.numpy as jnp
    from tqdm import tqdm

    from quasar_jax.prompts import encode, stop_ids_of
    from quasar_jax.engine import CACHE_BUCKET, Engine, GenerationConfig
    from quasar_jax.loading import load_model, load_tokenizer, resolve_model_dir

    requested = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes, added = resolve_modes(requested)
    questions = load_questions(args.questions, args.num_prompts)
    categories = [q.category for q in questions]

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = []
    for q in questions:
        ids = encode(tokenizer, q.text, args.chat)
        if args.max_prompt_tokens and len(ids) > args.max_prompt_tokens:
            ids = ids[-args.max_prompt_tokens:]  # keep the end (where the question is)
        if not ids:
            raise ValueError(f"question {q.question_id} ({q.source}) tokenizes to nothing")
        prompt_ids.append(ids)
    stop = () if args.ignore_eos else stop_ids_of(tokenizer, model_dir)
    max_len = round_up(max(map(len, prompt_ids)) + args.max_new_tokens, CACHE_BUCKET)

    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    model_fp = load_model(model_dir, dtype=dtype)
    model_q = None
    if any(SPECS[m].model == "int8" for m in modes):
        t0 = time.perf_counter()  # the same int8 weights as decode --verifier / fidelity
        model_q = load_model(model_dir, dtype=dtype, quantize="int8", backend=args.backend)
        int8_load_s = time.perf_counter() - t0
    else:
        int8_load_s = None
    engines = {"fp": Engine(model_fp, prompt_bucket=bucket),
               "int8": Engine(model_q, prompt_bucket=bucket) if model_q is not None else None}
    hf_model = None
    if any(SPECS[m].kind == "hf" for m in modes):
        hf_model = _load_hf_model(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)

    runners, plans = {}, {}
    for m in modes:
        spec = SPECS[m]
        if spec.kind == "jax":
            cfg = GenerationConfig(
                max_new_tokens=args.max_new_tokens, drafter=spec.drafter, num_draft=args.num_draft,
                ngram_min=args.ngram_min, ngram_max=args.ngram_max, verifier=spec.verifier,
                temperature=args.temperature, stop_ids=tuple(stop), max_len=max_len, seed=args.seed)
            runners[m] = JaxRunner(spec, engines[spec.model], cfg.validate())
            plans[m] = _make_batches(categories, args.batch_size)
        else:
            runners[m] = HFRunner(spec, hf_model, _hf_generation_config(args, spec, stop, pad_id))
            plans[m] = _make_batches(categories, 1)
    if any(SPECS[m].kind == "hf" for m in modes):
        import torch

        torch.manual_seed(args.seed)

    warm = {m: [] for m in modes}  # one warm-up batch per shape bucket (HF: one in all)
    for m in modes:
        seen = set()
        for b in plans[m]:
            key = _shape_key(prompt_ids, b.rows, bucket) if SPECS[m].kind == "jax" else ()
            if key not in seen:
                seen.add(key)
                warm[m].append(b)
    total = sum(len(warm[m]) + args.repeats * len(plans[m]) for m in modes)
    bar = tqdm(total=total, desc="bench", unit="batch", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for m in modes:  # warm-up (compiles; excluded from timing)
        bar.set_postfix_str(f"warm-up {m}")
        for b in warm[m]:
            runners[m]([prompt_ids[i] for i in b.rows])
            bar.update(1)

    outputs = {m: [None] * len(questions) for m in modes}
    steps = {m: [None] * len(questions) for m in modes}
    deterministic = {m: True for m in modes}
    for r in range(args.repeats):
        for m in modes:
            bar.set_postfix_str(f"round {r + 1}/{args.repeats} {m}")
            for b in plans[m]:
                toks, stp, wall = runners[m]([prompt_ids[i] for i in b.rows])
                b.walls.append(wall)
                for j, i in enumerate(b.rows):
                    ids = truncate_output(toks[j], stop, args.max_new_tokens)
                    if r == 0:
                        outputs[m][i], steps[m][i] = ids, int(stp[j])
                    elif ids != outputs[m][i]:
                        deterministic[m] = False
                bar.update(1)
    bar.close()

    runs = {m: ModeRun(m, outputs[m], steps[m], plans[m], compile_s=runners[m].compile_s,
                       reference=SPECS[m].reference, auto_added=m in added,
                       deterministic=deterministic[m]) for m in modes}
    summary = summarize(runs, categories)

    fid = {}
    if model_q is not None and not args.no_fidelity:
        for qmode, ar_mode in AR_OF_QUANT_MODE.items():
            if ar_mode not in runs:
                continue
            f = fidelity(model_fp, model_q, qmode, prompt_ids, outputs[BASELINE],
                         ar_q_outputs=outputs[ar_mode], bucket=bucket)
            per = f.pop("per_prompt")
            f["categories"] = {c: pool_fidelity([p for p, ci in zip(per, categories) if ci == c])
                               for c in dict.fromkeys(categories)}
            f["ar_mode"] = ar_mode
            fid[qmode] = f

    config = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()}
    config.update(model_dir=str(model_dir), modes_run=modes, modes_auto_added=added,
                  num_questions=len(questions),
                  categories={c: categories.count(c) for c in dict.fromkeys(categories)},
                  prompt_tokens={"min": min(map(len, prompt_ids)), "max": max(map(len, prompt_ids)),
                                 "mean": sum(map(len, prompt_ids)) / len(prompt_ids)},
                  stop_ids=list(stop), cache_len=max_len, int8_load_s=int8_load_s,
                  model_config=dataclasses.asdict(model_fp.config),
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    results = {"machine": machine_info(), "config": config, "modes": summary, "fidelity": fid}
    return {"results": results, "questions": questions, "prompt_ids": prompt_ids,
            "outputs": outputs, "tokenizer": tokenizer}


# ----------------------------------------------------------------------------- reporting
def _fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def results_markdown(results: dict) -> str:
    m, c, modes, fid = results["machine"], results["config"], results["modes"], results["fidelity"]
    lines = ["# quasar_jax benchmark", "",
             f"Machine: {m.get('cpu')} ({m.get('cores_available')} cores available of "
             f"{m.get('cpu_count')}, {m.get('memory_gib', '?')} GiB), jax {m.get('jax')} backend "
             f"`{m.get('backend')}`" + (f" on {m['gpu']}" if m.get("gpu") else "")
             + f", torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads); 1-min load "
             f"average {m.get('loadavg_1m_before', '?')} before, {m.get('loadavg_1m_after', '?')} after.", "",
             f"Model `{c['model']}` ({c['dtype']}), {c['num_questions']} prompts "
             f"({', '.join(f'{k}: {v}' for k, v in c['categories'].items())}), "
             f"max_new_tokens {c['max_new_tokens']}, K={c['num_draft']}, n-gram "
             f"{c['ngram_min']}..{c['ngram_max']}, batch {c['batch_size']}, temperature "
             f"{c['temperature']}, repeats {c['repeats']} (median), stop ids {c['stop_ids']}, "
             f"cache {c['cache_len']} slots, prompt bucket {c.get('prompt_bucket_used', '?')}"
             + (f", prompts cut to their last {c['max_prompt_tokens']} tokens" if c.get("max_prompt_tokens") else "")
             + ".", ""]
    lines += ["## Overall", "",
              "| mode | tau | tokens/s | speedup vs ar-fp | exact match (ref) | exact match vs ar-fp "
              "| new tokens | steps | timed wall s | repeat range s | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in modes.items():
        o = res["overall"]
        label = name + (" (ref)" if o.get("auto_added") else "")
        lines.append(
            f"| {label} | {_fmt(o['tau'])} | {_fmt(o['tokens_per_s'], 1)} | {_fmt(o['speedup_vs_ar_fp'])} "
            f"| {_fmt(o['exact_match'])} ({o['reference']}) | {_fmt(o['exact_match_vs_ar_fp'])} "
            f"| {o['new_tokens']} | {_fmt(o['verify_steps'])} | {_fmt(o['wall_s'], 3)} "
            f"| {_fmt(o.get('wall_s_min_repeat'), 2)}-{_fmt(o.get('wall_s_max_repeat'), 2)} "
            f"| {_fmt(o['compile_s'], 1)} |")
    cats = list(c["categories"])
    for key, title, digits in (("tau", "tau (tokens per verify step) per category", 2),
                               ("speedup_vs_ar_fp", "Speedup vs ar-fp per category", 2),
                               ("tokens_per_s", "Tokens/s per category", 1),
                               ("exact_match", "Exact match vs reference per category", 2)):
        lines += ["", f"## {title}", "", "| mode | " + " | ".join(cats) + " | overall |",
                  "|---" * (len(cats) + 2) + "|"]
        for name, res in modes.items():
            vals = [_fmt(res["categories"][k][key], digits) for k in cats]
            lines.append(f"| {name} | " + " | ".join(vals) + f" | {_fmt(res['overall'][key], digits)} |")
    if fid:
        lines += ["", "## Float vs int8 fidelity (teacher-forced along ar-fp outputs)", "",
                  "| activation mode | top-1 agreement | mean KL(p_fp \\|\\| p_q) nats | mean common "
                  "greedy prefix (tokens) | mean ar-fp tokens | positions |", "|---|---|---|---|---|---|"]
        for q, f in fid.items():
            lines.append(f"| {q} (AR run: {f['ar_mode']}) | {_fmt(f['top1_agreement'], 4)} "
                         f"| {_fmt(f['mean_kl'], 5)} | {_fmt(f['mean_common_prefix'], 1)} "
                         f"| {_fmt(f['mean_ar_fp_tokens'], 1)} | {f['positions']} |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = results["modes"]
    groups = list(results["config"]["categories"]) + ["overall"]
    width_in = min(24.0, max(8.0, 2.0 + 0.12 * len(groups) * max(1, len(modes))))
    fig, axes = plt.subplots(2, 1, figsize=(width_in, 8), sharex=True)
    width = 0.8 / max(1, len(modes))
    for ax, key, title in ((axes[0], "tau", "tau (tokens per verify step)"),
                           (axes[1], "speedup_vs_ar_fp", "speedup vs ar-fp (tokens/s ratio)")):
        for j, (name, res) in enumerate(modes.items()):
            vals = [(res["overall"] if g == "overall" else res["categories"][g])[key] for g in groups]
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(groups))]
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if pts:
                ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[1].set_xticks(range(len(groups)))
    axes[1].set_xticklabels(groups, rotation=30, ha="right")
    c = results["config"]
    fig.suptitle(f"{Path(str(c['model'])).name}: K={c['num_draft']}, max_new_tokens={c['max_new_tokens']}, "
                 f"{results['machine'].get('backend')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):  # NaN/inf are not JSON
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_outputs(bundle: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _clean(bundle["results"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    plot_results(results, out_dir / "plot.png")
    tok = bundle["tokenizer"]
    with open(out_dir / "outputs.jsonl", "w") as f:
        for i, q in enumerate(bundle["questions"]):
            row = {"question_id": q.question_id, "category": q.category, "source": q.source,
                   "prompt_tokens": len(bundle["prompt_ids"][i]),
                   "outputs": {m: o[i] for m, o in bundle["outputs"].items()},
                   "text": {m: tok.decode(o[i], skip_special_tokens=False)
                            for m, o in bundle["outputs"].items()}}
            f.write(json.dumps(row, default=_json_default) + "\n")


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m quasar_jax.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    p.add_argument("--questions", nargs="+", required=True, metavar="FILE.jsonl",
                   help="Spec-Bench jsonl files (question_id, category, turns)")
    p.add_argument("--num-prompts", type=positive_int, default=None,
                   help="first N prompts of each category (default: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all but ar-w8a8, "
                        "which is added as the reference of quasar-w8a8)")
    p.add_argument("--num-draft", type=positive_int, default=5, help="K, draft tokens per step")
    p.add_argument("--ngram-min", type=positive_int, default=1)
    p.add_argument("--ngram-max", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=1, help="JAX modes (HF: always 1)")
    p.add_argument("--temperature", type=float_in(0.0, 100.0, False), default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX model dtype (HF modes always run torch float32)")
    p.add_argument("--backend", choices=["xla", "pallas"], default="xla", help="int8 matmul backend")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (all modes)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="keep only the last N prompt tokens (default: no limit)")
    p.add_argument("--prompt-bucket", type=positive_int, default=None,
                   help="pad prompts to a multiple of N tokens (default: the engine's 32); a "
                        "coarser bucket compiles fewer programs")
    p.add_argument("--no-fidelity", action="store_true", help="skip the float-vs-int8 fidelity pass")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        if args.ngram_min > args.ngram_max:
            raise ValueError(f"--ngram-min {args.ngram_min} > --ngram-max {args.ngram_max}")
        bundle = run_benchmark(args, progress=not args.no_progress)
        out = Path(args.out)
        write_outputs(bundle, out)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m quasar_jax.bench: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(results_markdown(_clean(bundle["results"])))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'plot.png'}, "
          f"{out / 'outputs.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
