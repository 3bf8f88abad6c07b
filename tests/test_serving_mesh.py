"""Serving on a mesh of 8 (fake CPU) devices: the same tokens as one device offline, for every
verifier and under forced switching of draft length; nothing compiles per request; the compiled
chunk programs gather no weight and no cache inside their loop.

Runs only where 8 devices exist; ``tests/test_sharding.py`` launches it in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (next to ``test_sharding_mesh.py``).
"""

from __future__ import annotations

import argparse
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slot_driver import CyclingPolicy, run_requests
from test_sharding_mesh import _gathered, _loop_text, ckpt  # noqa: F401  (the checkpoint fixture)
from quasar_jax import sharding
from quasar_jax.cli.mesh_flags import MeshSpec
from quasar_jax.serving.scheduler import PromptLogprobs, Request, Scheduler, Tokens
from quasar_jax.serving.slots import SlotEngine
from quasar_jax.serving.speculation import AdaptivePolicy, draft_options, make_policy
from quasar_jax.speculative.drafters import NGramDrafter
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.sampling import SamplingParams
from quasar_jax.weights.loading import load_model

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices (run via test_sharding.py)")

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11, 12],
           [40, 3, 77, 21, 9, 60, 2, 15, 88], [1, 2, 1, 2, 1, 2, 1, 2, 1], [50], [7, 7, 7, 7, 7, 7]]
BUDGETS = [18, 11, 15, 20, 9, 13]
S = 96  # cache slots (not the vocabulary's 128, so a cache-shaped gather is told apart)
MESH = "data=2,model=4"


@pytest.fixture(scope="module")
def reference(ckpt):
    """One device, offline, autoregressive: each prompt's greedy tokens up to its budget."""
    out = {}
    for verifier in ("float", "w8a16", "w8a8"):
        model = load_model(ckpt, int8=verifier != "float")
        got = Engine(model).generate(PROMPTS, GenerationConfig(max_new_tokens=max(BUDGETS), drafter="none",
                                                               verifier=verifier, max_len=S)).tokens
        out[verifier] = [row[:n] for row, n in zip(got, BUDGETS)]
    return out


def _serve(engine, policy=None):
    scheduler = Scheduler(engine, policy=policy).start()
    try:
        return run_requests(scheduler, [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, BUDGETS)])[0]
    finally:
        scheduler.stop()


@pytest.fixture(scope="module")
def auto_float(ckpt):
    """float on data=2,model=4 with the auto chunk programs K = 0, 2, 3."""
    model = load_model(ckpt, mesh=MESH)
    return SlotEngine(model, draft_options(NGramDrafter(3), "auto"), "float", slots=4, max_len=S, chunk_steps=3,
                      prefill_buckets=(8,), mesh=MESH)


def test_sharded_server_equals_one_device_under_forced_switching(auto_float, reference):
    assert auto_float.ks == (0, 2, 3)
    policy = CyclingPolicy(3)
    assert _serve(auto_float, policy) == reference["float"]
    assert set(policy.used) == {0, 1, 2}


def test_sharded_adaptive_server_compiles_nothing_per_request(auto_float, reference):
    policy = make_policy(auto_float, "auto")  # calibrates every program (runs them)
    assert isinstance(policy, AdaptivePolicy) and all(t > 0 for pair in policy.calibration for t in pair)
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        got = _serve(auto_float, policy)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert got == reference["float"] and compiles == []


def test_slot_state_is_placed_by_the_rules(auto_float):
    st = auto_float.state
    assert st.loop.cache.k.sharding.spec == P(None, "data", None, "model", None)
    assert st.loop.history.sharding.spec == P("data", None) and st.rows.temperature.sharding.spec == P("data")
    assert st.max_new.sharding.spec == P("data") and st.loop.emitted_hist.shape == (4, 3 + 2)
    assert auto_float.model.layers[0].mlp.down_proj.kernel[...].sharding.spec == P("model", None)


def test_chunk_programs_gather_no_weight_or_cache_in_the_loop(auto_float):
    """Per step only small values cross devices: no all-gather of a weight anywhere, and none
    with the cache's slot axis (S = 96) or of new K/V rows inside the loop (the per-row cache
    write keeps each data shard's K/V rows where they live). The programs carry the server's
    logits stage (penalties, logit bias, min_tokens, logprobs)."""
    hlo_dtype = {"float32": "f32", "int8": "s8", "bfloat16": "bf16"}
    weights = {(hlo_dtype[str(x.dtype)], tuple(x.shape)) for x in jax.tree.leaves(auto_float.params) if x.ndim == 2}
    for compiled in auto_float._chunk:
        hlo = compiled.as_text()
        assert "while" in hlo and not _gathered(hlo) & weights
        loop = _gathered(_loop_text(hlo))
        assert not [s for _, s in loop if S in s], f"cache-shaped all-gather in the loop: {sorted(loop)}"
        # new K/V rows [B, T, G, E] are float and rank 4; the logits stage's int32 scatter indices
        # (token counts, drafted paths: [B, T, ..] ids, a few hundred bytes) may cross devices
        kv = [(d, s) for d, s in loop if len(s) >= 4 and d in ("f32", "bf16", "f16")]
        assert not kv, f"a K/V-shaped all-gather in the loop: {sorted(loop)}"
    assert not _gathered(auto_float._admit.as_text())  # admission copies the row where it lives


@pytest.mark.parametrize("verifier", ["w8a16", "w8a8"])
def test_sharded_int8_servers_equal_one_device(ckpt, reference, verifier):
    model = load_model(ckpt, int8=True, mesh=MESH)
    engine = SlotEngine(model, NGramDrafter(3), verifier, slots=4, max_len=S, chunk_steps=3, prefill_buckets=(8,),
                        mesh=MESH)
    assert _serve(engine) == reference[verifier]


def test_a_smaller_mesh_runs_on_the_first_devices(ckpt, reference, capsys):
    mesh = sharding.start(argparse.Namespace(mesh=MeshSpec(1, 2)), "prog")  # what serve / decode / bench call
    assert list(mesh.devices.flat) == jax.devices()[:2]
    assert capsys.readouterr().err == "prog: mesh data=1,model=2 runs on the first 2 of the 8 devices\n"
    model = load_model(ckpt, mesh="model=2")
    engine = SlotEngine(model, NGramDrafter(3), "float", slots=2, max_len=S, chunk_steps=3, prefill_buckets=(8,),
                        mesh="model=2")
    assert list(engine.mesh.devices.flat) == jax.devices()[:2]
    assert _serve(engine) == reference["float"]


def _events(scheduler, requests):
    """Every event of each request, in order (PromptLogprobs, Tokens, Finished)."""
    lock, done, events, ended = threading.Lock(), threading.Event(), {r.rid: [] for r in requests}, set()
    for req in requests:
        def sink(event, req=req):
            with lock:
                events[req.rid].append(event)
                if hasattr(event, "reason") and sum(hasattr(e, "reason") for e in events[req.rid]) == req.n:
                    ended.add(req.rid)
                    if len(ended) == len(requests):
                        done.set()
        req.sink = sink
        scheduler.submit(req)
    assert done.wait(300)
    return [events[r.rid] for r in requests]


def test_logits_stage_n_and_echo_through_the_sharded_server(ckpt, auto_float):
    """Penalties, logit bias, min_tokens, logprobs, echo and n = 2 from one prefill, through the
    sharded server under forced switching of K: the same tokens as one device offline (greedy
    with penalties equals autoregressive decoding with them), logprobs equal one device's."""
    from quasar_jax.serving.scheduler import PromptLogprobs, Tokens
    from quasar_jax.speculative.sampling import SamplingParams

    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, min_tokens=4,
                            logit_bias={5: -100.0, 9: 3.0}, logprobs=2)
    model = load_model(ckpt)
    offline = Engine(model).generate(PROMPTS[:3], GenerationConfig(max_new_tokens=10, drafter="none", max_len=S),
                                     sampling=[params] * 3)
    one = SlotEngine(model, NGramDrafter(3), "float", slots=4, max_len=S, chunk_steps=3, prefill_buckets=(8,))
    got = {}
    for name, engine, policy in (("mesh", auto_float, CyclingPolicy(3)), ("one", one, None)):
        scheduler = Scheduler(engine, policy=policy).start()
        try:
            reqs = [Request(prompt=p, max_tokens=10, sampling=params, n=2, prompt_logprobs=2) for p in PROMPTS[:3]]
            got[name] = _events(scheduler, reqs)
        finally:
            scheduler.stop()
    for name, runs in got.items():
        for events, prompt, want, want_lp in zip(runs, PROMPTS, offline.tokens, offline.logprobs):
            echo = [e for e in events if isinstance(e, PromptLogprobs)]
            assert len(echo) == 1 and len(echo[0].logprobs) == len(prompt) and echo[0].logprobs[0] is None
            for choice in (0, 1):
                toks = [e for e in events if isinstance(e, Tokens) and e.index == choice]
                assert [t for e in toks for g in e.groups for t in g] == list(want), (name, choice)
                lps = [lp for e in toks for lp in e.logprobs]
                np.testing.assert_allclose([lp.logprob for lp in lps], [lp.logprob for lp in want_lp], atol=1e-4)
                assert all(len(lp.top) == 2 for lp in lps)
    for mesh_events, one_events in zip(got["mesh"], got["one"]):
        a, b = (next(e for e in ev if isinstance(e, PromptLogprobs)).logprobs[1:] for ev in (mesh_events, one_events))
        np.testing.assert_allclose([x.logprob for x in a], [x.logprob for x in b], atol=1e-4)


SHARED = [7, 3, 9, 21, 4, 4, 8, 30, 2, 11, 5, 6, 7, 8, 9, 5, 6]  # a shared 17-token prefix (two pages of 8)
PAGED_PROMPTS = [SHARED + t for t in ([1, 2, 1, 2], [50, 51], [60, 3, 77, 21, 9], [5, 6, 7, 8, 9, 5])] + PROMPTS[:2]
PAGED_BUDGETS = [14, 9, 12, 16, 10, 8]


@pytest.mark.parametrize("mesh,kv_dtype,kv_pages", [("data=2,model=4", "auto", 10), ("data=1,model=4", "int8", 48)])
def test_paged_server_on_a_mesh_equals_one_device(ckpt, mesh, kv_dtype, kv_pages):
    """Pages on a mesh (the pool's KV heads on model, page tables replicated): the same tokens
    and the same prefix hits as one paged device, with float and int8 pages; a small pool preempts
    and still loses nothing (one chunk program, K = 3, to keep the compiles few)."""
    from quasar_jax.model.paged_kv_cache import CacheSpec
    from quasar_jax.serving.paged_scheduler import PagedScheduler
    from quasar_jax.serving.speculation import FixedPolicy

    def serve(model, mesh_):
        engine = SlotEngine(model, draft_options(NGramDrafter(3), 3), "float", slots=4, max_len=S,
                            chunk_steps=3, prefill_buckets=(8,), mesh=mesh_,
                            cache_spec=CacheSpec("paged", page_size=8, kv_dtype=kv_dtype), kv_pages=kv_pages)
        scheduler = PagedScheduler(engine, policy=FixedPolicy(0)).start()
        try:
            got = run_requests(scheduler, [Request(prompt=p, max_tokens=n)
                                           for p, n in zip(PAGED_PROMPTS, PAGED_BUDGETS)])[0]
        finally:
            scheduler.stop()
        return engine, got, scheduler.pages.stats()

    engine, got, stats = serve(load_model(ckpt, mesh=mesh), mesh)
    pool = engine.state.loop.cache.kv[0]
    assert pool.sharding.spec == P(None, None, "model", None)  # 2G = 8 over model = 4
    assert engine.state.loop.cache.page_table.sharding.is_fully_replicated
    _, want, want_stats = serve(load_model(ckpt), None)
    assert got == want
    assert stats["prefix_hit_tokens"] == want_stats["prefix_hit_tokens"] > 0
    if kv_pages == 10:
        assert stats["preemptions"] > 0
