"""Orchestration: load the models once, build one runner per mode, warm up every shape bucket,
time ``--repeats`` interleaved rounds, summarise, and run the float-vs-int8 fidelity pass."""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time

import jax.numpy as jnp
from tqdm import tqdm

from quasar_jax.bench.metrics import ModeRun, make_batches, summarize, truncate_output
from quasar_jax.bench.modes import AR_OF_QUANT_MODE, BASELINE, SPECS, resolve_modes
from quasar_jax.bench.report import loadavg, machine_info
from quasar_jax.bench.step_cost import step_cost
from quasar_jax.bench.runners import (HFRunner, JaxRunner, hf_generation_config, jax_generation_config,
                                      load_hf_model, shape_key)
from quasar_jax.cli.prompts import encode, load_questions, stop_ids_of
from quasar_jax.fidelity.metrics import fidelity, pool_fidelity
from quasar_jax.speculative.buckets import CACHE_BUCKET, PROMPT_BUCKET, round_up
from quasar_jax.speculative.engine import Engine
from quasar_jax.speculative.heads import resolve_heads
from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir


def encode_prompts(tokenizer, questions, chat: bool, max_prompt_tokens: int | None) -> list[list[int]]:
    """Prompt ids of each question, cut to their last ``max_prompt_tokens`` tokens."""
    prompt_ids = []
    for q in questions:
        ids = encode(tokenizer, q.text, chat)
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]  # keep the end (where the question is)
        if not ids:
            raise ValueError(f"question {q.question_id} ({q.source}) tokenizes to nothing")
        prompt_ids.append(ids)
    return prompt_ids


def _warmup_batches(modes, plans, prompt_ids, bucket: int) -> dict:
    """One batch per (mode, shape bucket); HF modes: one in all."""
    warm = {m: [] for m in modes}
    for m in modes:
        seen = set()
        for b in plans[m]:
            key = shape_key(prompt_ids, b.rows, bucket) if SPECS[m].kind == "jax" else ()
            if key not in seen:
                seen.add(key)
                warm[m].append(b)
    return warm


def _time_modes(args, modes, runners, plans, prompt_ids, stop, bucket: int, progress: bool):
    """Warm up, then time ``args.repeats`` rounds (modes interleaved round by round)."""
    warm = _warmup_batches(modes, plans, prompt_ids, bucket)
    total = sum(len(warm[m]) + args.repeats * len(plans[m]) for m in modes)
    bar = tqdm(total=total, desc="bench", unit="batch", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for m in modes:  # warm-up (compiles; excluded from timing)
        bar.set_postfix_str(f"warm-up {m}")
        for b in warm[m]:
            runners[m]([prompt_ids[i] for i in b.rows])
            bar.update(1)

    outputs = {m: [None] * len(prompt_ids) for m in modes}
    steps = {m: [None] * len(prompt_ids) for m in modes}
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
    return outputs, steps, deterministic


def _fidelity_pass(model_fp, model_q, runs, prompt_ids, categories, bucket: int) -> dict:
    fid = {}
    for qmode, ar_mode in AR_OF_QUANT_MODE.items():
        if ar_mode not in runs:
            continue
        f = fidelity(model_fp, model_q, qmode, prompt_ids, runs[BASELINE].outputs,
                     ar_q_outputs=runs[ar_mode].outputs, bucket=bucket)
        per = f.pop("per_prompt")
        f["categories"] = {c: pool_fidelity([p for p, ci in zip(per, categories) if ci == c])
                           for c in dict.fromkeys(categories)}
        f["ar_mode"] = ar_mode
        fid[qmode.value] = f
    return fid


def run_benchmark(args, progress: bool = True) -> dict:
    """Run every mode on the questions of ``args`` -> results and raw outputs (see ``cli.main``)."""
    load_before = loadavg()
    bucket = args.prompt_bucket or PROMPT_BUCKET
    modes, added = resolve_modes([m.strip() for m in args.modes.split(",") if m.strip()])
    questions = load_questions(args.questions, args.num_prompts)
    categories = [q.category for q in questions]

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_prompts(tokenizer, questions, args.chat, args.max_prompt_tokens)
    stop = () if args.ignore_eos else stop_ids_of(tokenizer, model_dir)
    max_len = round_up(max(map(len, prompt_ids)) + args.max_new_tokens, CACHE_BUCKET)

    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    mesh = getattr(args, "mesh_obj", None)  # set by the command line from --mesh
    model_fp = load_model(model_dir, dtype=dtype, mesh=mesh)
    model_q, int8_load_s = None, None
    if any(SPECS[m].model == "int8" for m in modes):
        t0 = time.perf_counter()  # the same int8 weights as decode --verifier / fidelity
        model_q = load_model(model_dir, dtype=dtype, int8=True, backend=args.backend, mesh=mesh)
        int8_load_s = time.perf_counter() - t0
    page = getattr(args, "page_size", 16)
    engines = {"float": Engine(model_fp, prompt_bucket=bucket, mesh=mesh, page_size=page),
               "int8": Engine(model_q, prompt_bucket=bucket, mesh=mesh, page_size=page)
               if model_q is not None else None}
    hf_model = load_hf_model(model_dir, args.seed) if any(SPECS[m].kind == "hf" for m in modes) else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)

    heads = (resolve_heads(getattr(args, "heads", None), model_dir, num_draft=args.num_draft)
             if any(SPECS[m].drafter == "s4c" for m in modes) else None)
    runners, plans = {}, {}
    for m in modes:
        spec = SPECS[m]
        if spec.kind == "jax":
            cfg = jax_generation_config(args, spec, stop, max_len, heads)
            runners[m] = JaxRunner(spec, engines[spec.model], cfg)
            plans[m] = make_batches(categories, args.batch_size)
        else:
            runners[m] = HFRunner(spec, hf_model, hf_generation_config(args, spec, stop, pad_id))
            plans[m] = make_batches(categories, 1)
    outputs, steps, deterministic = _time_modes(args, modes, runners, plans, prompt_ids, stop, bucket,
                                                progress)
    runs = {m: ModeRun(m, outputs[m], steps[m], plans[m], compile_s=runners[m].compile_s,
                       reference=SPECS[m].reference, auto_added=m in added,
                       deterministic=deterministic[m]) for m in modes}
    summary = summarize(runs, categories)
    costs = {} if getattr(args, "no_step_cost", False) or mesh is not None else {
        m: step_cost(runners[m].engine, runners[m].config.make_drafter(), SPECS[m].verifier,
                     args.batch_size, max_len)
        for m in modes if SPECS[m].kind == "jax" and SPECS[m].drafter != "none"}
    fid = ({} if model_q is None or args.no_fidelity else
           _fidelity_pass(model_fp, model_q, runs, prompt_ids, categories, bucket))

    config = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()}
    config.update(model_dir=str(model_dir), modes_run=modes, modes_auto_added=added,
                  num_questions=len(questions),
                  categories={c: categories.count(c) for c in dict.fromkeys(categories)},
                  prompt_tokens={"min": min(map(len, prompt_ids)), "max": max(map(len, prompt_ids)),
                                 "mean": sum(map(len, prompt_ids)) / len(prompt_ids)},
                  stop_ids=list(stop), cache_len=max_len, int8_load_s=int8_load_s,
                  model_config=dataclasses.asdict(model_fp.config),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), prompt_bucket_used=bucket)
    machine = {**machine_info(), "loadavg_1m_before": load_before, "loadavg_1m_after": loadavg()}
    results = {"machine": machine, "config": config, "modes": summary, "fidelity": fid, "step_cost": costs}
    return {"results": results, "questions": questions, "prompt_ids": prompt_ids,
            "outputs": outputs, "tokenizer": tokenizer}
