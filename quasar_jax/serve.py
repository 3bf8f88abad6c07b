"""OpenAI-compatible server with continuous batching: ``python -m quasar_jax.serve --model demo``.

Serves ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or not), ``GET
/v1/models``, ``GET /health`` and ``GET /metrics`` with FastAPI + uvicorn. A fixed number of slots
(batch rows) share one compiled draft-verify-accept loop; requests join and leave between device
chunks without recompiling. ``--speculation auto`` switches between chunk programs of several
draft lengths by load and acceptance. ``--mesh data=D,model=M`` shards the slots and the model
over devices; with the multi-host flags every process runs this command (process 0 serves HTTP,
the others follow it in lockstep). SIGTERM (or Ctrl-C) stops accepting connections, lets
in-flight requests finish, then exits (every process). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging

from quasar_jax.cli.flags import (add_compile_cache_flag, add_drafter_flag, add_drafting_flags, add_kv_flags,
                                  add_model_flags, add_verifier_flag, argparse_type, check_drafter_flags,
                                  float_in, non_negative_int, parse_speculation, positive_int)
from quasar_jax.cli.mesh_flags import add_mesh_flags
from quasar_jax.cli.runner import OneLineParser, run_command

PROG = "python -m quasar_jax.serve"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_model_flags(p)
    add_drafter_flag(p, note="; server-wide")
    add_drafting_flags(p)
    add_verifier_flag(p)
    add_compile_cache_flag(p)
    p.add_argument("--slots", type=positive_int, default=16, help="batch rows, one request each (default: 16)")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per request, prompt + completion at most (default: the model's context, "
                        "max_position_embeddings; at most 4096 with --kv-layout dense)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="allow --max-len past the model's max_position_embeddings (default: an error)")
    p.add_argument("--chunk-steps", type=positive_int, default=8,
                   help="verify steps per device call before the host looks again (default: 8)")
    p.add_argument("--prefill-chunk", type=positive_int, default=128,
                   help="largest prompt piece prefilled at once; prompt tokens prefilled between two "
                        "decode chunks while other rows decode (default: 128)")
    p.add_argument("--prefill-budget", type=non_negative_int, default=None, metavar="TOKENS",
                   help="prompt tokens prefilled per scheduler iteration while other rows decode (at least "
                        "one piece), as vLLM's --max-num-batched-tokens: a long prompt is prefilled in pieces "
                        "between decode chunks; 0: no budget, a whole prompt before the next chunk "
                        "(default: --prefill-chunk)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a slot before 429 (a batch of prompts is one request, "
                        "queued whole or refused whole) (default: 64)")
    p.add_argument("--max-request-bytes", type=positive_int, default=64 << 20,
                   help="largest request body; larger ones get 413 (default: 64 MiB)")
    p.add_argument("--served-model-name", default=None, help="the model id of the API (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to wait for in-flight requests on shutdown (default: no limit)")
    p.add_argument("--speculation", type=argparse_type(parse_speculation), default="auto", metavar="auto|off|K",
                   help="auto: chunk programs for K = 0, 2 and --num-draft (the tree too with "
                        "--num-candidates), one picked before each chunk from the busy slots and the "
                        "recent acceptance; off: no drafts (K = 0); K: always K drafts (default: auto)")
    add_kv_flags(p)
    p.add_argument("--kv-layout", choices=("paged", "dense"), default=None,
                   help="paged: one pool of KV pages for all slots (prefix caching, preemption); dense: "
                        "a --max-len strip per slot (default: paged on one device, dense on a mesh)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-pages", type=positive_int, default=None,
                    help="KV pages in the pool (default: the memory of the dense cache, slots x max-len)")
    kv.add_argument("--kv-memory-fraction", type=float_in(0.0, 1.0, True), default=None,
                    help="size the pool to this fraction of the device memory left after the weights "
                         "(as vLLM's gpu_memory_utilization)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse cached prompt prefixes (default: on)")
    add_mesh_flags(p)
    p.add_argument("--peer-timeout", type=float_in(0.0, 86400.0, True), default=60.0,
                   help="multi-host: seconds without an answer from the other processes before the "
                        "group ends (default: 60)")
    return p


def run(args, given: set[str]) -> int:
    # The model code (and JAX) load here, after the arguments are known to be valid.
    import jax
    import jax.numpy as jnp

    from quasar_jax.cli import compile_cache

    from quasar_jax import sharding
    from quasar_jax.cli.errors import InputError
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.model.config import Qwen3Config
    from quasar_jax.serving import lockstep
    from quasar_jax.serving.server import ServeConfig, build, make_engine, serve_forever
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.speculative.heads import resolve_heads
    from quasar_jax.weights.checkpoint import default_verifier
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be >= 2, got {args.max_len}")
    check_drafter_flags(args, given)
    mesh = sharding.start(args, PROG)  # jax.distributed when asked for; stdout on process 0 only
    model_dir = resolve_model_dir(args.model)
    verifier = args.verifier
    if verifier == "auto":
        verifier = default_verifier(model_dir, args.drafter, jax.default_backend()).value
    config = Qwen3Config.from_json(model_dir / "config.json")
    context = config.max_position_embeddings
    if args.max_len is not None and args.max_len > context and not args.allow_long_context:
        raise InputError(f"--max-len {args.max_len} is past the model's context of {context} positions "
                         f"(max_position_embeddings in {model_dir / 'config.json'}): lower it, or pass "
                         "--allow-long-context")
    if args.plan:
        plan = sharding.memory_plan(
            config, args.mesh, dtype=args.dtype,
            int8=verifier != "float", quantize_lm_head=args.quantize_lm_head, batch=args.slots,
            cache_len=args.max_len or min(context, 4096), device_gb=sharding.device_memory_bytes() / sharding.GiB, name=args.model)
        print(plan.line())
        return 0
    compile_cache.enable(args.compile_cache)
    heads = (resolve_heads(args.heads, model_dir, num_draft=args.num_draft, tree_nodes=args.tree_nodes)
             if args.drafter == "s4c" else None)
    drafter = make_drafter(args.drafter, num_draft=args.num_draft, ngram_min=args.ngram_min,
                           ngram_max=args.ngram_max, ngram_prefer=args.ngram_prefer, heads=heads,
                           num_candidates=args.num_candidates, tree_nodes=args.tree_nodes)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = stop_ids_of(tokenizer, model_dir)
    cfg = ServeConfig(drafter=drafter, verifier=verifier, slots=args.slots, max_len=args.max_len,
                      chunk_steps=args.chunk_steps, prefill_chunk=args.prefill_chunk,
                      prefill_budget=args.prefill_budget, max_queue=args.max_queue,
                      max_request_bytes=args.max_request_bytes,
                      speculation=args.speculation, mesh=mesh, kv_layout=args.kv_layout,
                      page_size=args.page_size, kv_pages=args.kv_pages,
                      kv_memory_fraction=args.kv_memory_fraction, kv_dtype=args.kv_dtype,
                      prefix_caching=not args.no_prefix_caching,
                      allow_long_context=args.allow_long_context).for_stop_ids(stop_ids).for_model(config)
    model = load_model(model_dir, dtype=jnp.float32 if args.dtype == "float32" else jnp.bfloat16,
                       int8=cfg.verifier.is_int8, quantize_lm_head=args.quantize_lm_head,
                       backend=args.backend, mesh=mesh)
    log = logging.getLogger("quasar_jax.serving")
    log.warning("compiling %s/%s (speculation %s) for %d slots x %d cache slots%s ...", args.drafter, verifier,
                args.speculation, cfg.slots, cfg.max_len, f" on mesh {args.mesh}" if mesh is not None else "")
    engine, on_fatal = make_engine(model, cfg), None
    if jax.process_count() > 1:  # every process runs the same programs; process 0 decides which
        if not sharding.is_primary():
            return lockstep.follow(engine, peer_timeout=args.peer_timeout, prog=PROG)
        engine = lockstep.Leader(engine, peer_timeout=args.peer_timeout, prog=PROG)
        on_fatal = lambda err: lockstep.end_group(PROG, str(err), delay=1.0)  # noqa: E731
    try:
        app, _, _ = build(model, tokenizer, cfg, model_name=args.served_model_name or args.model,
                          stop_ids=stop_ids, engine=engine, on_fatal=on_fatal)
    except lockstep.GroupLost as err:  # while timing the programs with the other processes
        lockstep.end_group(PROG, str(err))
    serve_forever(app, args.host, args.port, args.drain_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
