"""Serving over one paged KV pool: lossless against offline decoding with prefix caching on and off,
prefix hits independent of speculation, preemption when pages run out (recomputed, nothing lost or
repeated), int8 KV."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from slot_driver import run_requests
from quasar_jax.model.paged_kv_cache import CacheSpec
from quasar_jax.serving.paged_scheduler import PagedScheduler
from quasar_jax.serving.scheduler import Request
from quasar_jax.serving.slots import SlotEngine
from quasar_jax.serving.speculation import FixedPolicy, draft_options
from quasar_jax.speculative.drafters import make_drafter
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load_model

S = 96
SYSTEM = [7, 3, 9, 21, 4, 4, 8, 30, 2, 11, 5, 6, 7, 8, 9, 5, 6, 7, 40, 41]  # a shared 20-token prefix
PROMPTS = [SYSTEM + tail for tail in ([1, 2, 1, 2], [50, 51], [60, 3, 77, 21, 9], [5, 6, 7, 8, 9, 5], [33])]
BUDGETS = [20, 13, 17, 24, 9]


@pytest.fixture(scope="module")
def model(hf_tiny):
    return load_model(hf_tiny(False, 2)[0], dtype=jnp.float32)


@pytest.fixture(scope="module")
def offline(model):
    engine = Engine(model, kv_layout="dense")
    return [engine.generate([p], GenerationConfig(max_new_tokens=n, drafter="none", max_len=S)).tokens[0]
            for p, n in zip(PROMPTS, BUDGETS)]


def _engine(model, kv_pages, kv_dtype="auto"):
    drafters = draft_options(make_drafter("ngram", num_draft=3), "auto")  # K = 0 and K = 3
    return SlotEngine(model, drafters, "float", slots=3, max_len=S, chunk_steps=3, prefill_buckets=(8,),
                      cache_spec=CacheSpec("paged", page_size=8, kv_dtype=kv_dtype), kv_pages=kv_pages)


@pytest.fixture(scope="module")
def roomy(model):
    return _engine(model, kv_pages=40)


@pytest.fixture(scope="module")
def tight(model):
    return _engine(model, kv_pages=12)  # fewer than 3 rows' worth: preemption


def _run(engine, program, **kw):
    scheduler = PagedScheduler(engine, policy=FixedPolicy(program), **kw).start()
    try:
        got, ends = run_requests(scheduler, [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, BUDGETS)])
    finally:
        scheduler.stop()
    engine.reset()
    return got, ends, scheduler.pages.stats()


def test_prefix_caching_lossless_and_hits_equal_with_and_without_speculation(roomy, offline):
    hits = {}
    for program in (0, 1):  # speculation off, K = 3
        got, ends, stats = _run(roomy, program)
        assert got == offline
        assert [e.new_tokens for e in ends] == BUDGETS
        assert stats["prefix_hit_tokens"] > 0 and stats["preemptions"] == 0
        hits[program] = stats["prefix_hit_tokens"]
    assert hits[0] == hits[1]  # speculation does not cost prefix hits
    got, _, stats = _run(roomy, 1, prefix_caching=False)
    assert got == offline and stats["prefix_hit_tokens"] == 0


def test_preemption_recomputes_and_loses_nothing(tight, offline):
    got, ends, stats = _run(tight, 1)
    assert stats["preemptions"] > 0
    assert got == offline
    assert [e.new_tokens for e in ends] == BUDGETS and {e.reason for e in ends} == {"length"}


def test_int8_kv_serving_equals_offline_int8_kv(model):
    engine = Engine(model)
    want = [engine.generate([p], GenerationConfig(max_new_tokens=n, drafter="none", max_len=S,
                                                  kv_dtype="int8")).tokens[0] for p, n in zip(PROMPTS, BUDGETS)]
    got, _, _ = _run(_engine(model, kv_pages=40, kv_dtype="int8"), 1)
    assert got == want


def test_server_metrics_and_a_prompt_that_can_never_fit(demo_server, monkeypatch):
    import httpx

    url, pages = demo_server["url"], demo_server["scheduler"].pages
    assert pages is not None  # the demo server runs on pages (the default on one device)
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 2
    before = pages.stats()["prefix_hit_tokens"]
    for _ in range(2):  # the second finds the first's prompt pages
        r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": prompt, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
    assert pages.stats()["prefix_hit_tokens"] >= before + pages.page_size
    text = httpx.get(url + "/metrics", timeout=30).text
    for name in ("quasar_kv_pages_used", "quasar_kv_pages_free", "quasar_kv_prefix_queried_tokens",
                 "quasar_kv_prefix_hit_tokens", "quasar_kv_evictions", "quasar_kv_preemptions"):
        assert name in text
    monkeypatch.setattr(pages.tables.pool, "num_pages", 2)
    r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": prompt, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "KV pages" in message and "holds 2" in message


LONG = [(13 * i + 5) % 90 + 3 for i in range(64)]  # a 64-token prompt: 8 prefill pieces of 8


@pytest.mark.parametrize("budget", [8, 0])
def test_running_stream_flows_while_a_long_prompt_prefills(roomy, model, budget, monkeypatch):
    """With a prefill budget the long prompt's pieces alternate with decode chunks (the running
    stream gets tokens in between); with none (0) it is prefilled whole before the next chunk.
    Both stay lossless."""
    import threading

    from quasar_jax.serving.scheduler import Tokens

    log, lock, started, done = [], threading.Lock(), threading.Event(), threading.Event()
    prefill, chunk = roomy.prefill, roomy.chunk
    monkeypatch.setattr(roomy, "prefill", lambda *a, **k: (log.append("prefill"), prefill(*a, **k))[1])
    monkeypatch.setattr(roomy, "chunk", lambda *a, **k: (log.append("chunk"), chunk(*a, **k))[1])
    got = {"run": [], "long": []}

    def sink(name):
        def on(event):
            with lock:
                if isinstance(event, Tokens):
                    got[name] += [t for g in event.groups for t in g]
                    log.append(name)
                    started.set()
                elif name == "long":
                    done.set()
        return on

    scheduler = PagedScheduler(roomy, policy=FixedPolicy(1), prefill_budget=budget).start()
    try:
        scheduler.submit(Request(prompt=PROMPTS[0], max_tokens=60, sink=sink("run")))
        assert started.wait(120)
        with lock:
            del log[:]
        scheduler.submit(Request(prompt=LONG, max_tokens=4, sink=sink("long")))
        assert done.wait(120)
    finally:
        scheduler.stop()
    roomy.reset()
    first, last = log.index("prefill"), len(log) - 1 - log[::-1].index("prefill")
    assert log.count("prefill") == 8  # 63 prompt tokens in pieces of 8
    between = log[first:last].count("run")  # tokens of the running stream while the long prompt prefilled
    assert between >= 7 if budget else between == 0
    engine = Engine(model, kv_layout="dense")
    for name, prompt, n in (("run", PROMPTS[0], 60), ("long", LONG, 4)):
        want = engine.generate([prompt], GenerationConfig(max_new_tokens=n, drafter="none", max_len=S)).tokens[0]
        assert got[name][:len(want)] == want and len(got[name]) == n
