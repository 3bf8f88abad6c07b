"""Slots without HTTP: free slots never change a live row, switching draft length is lossless, the
speculation policy's rule, and the lockstep protocol (ops through the real exchange, one process)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slot_driver import CyclingPolicy, run_requests
from quasar_jax.serving import lockstep
from quasar_jax.serving.scheduler import Request, Scheduler
from quasar_jax.serving.slots import SlotEngine, stage_prompt
from quasar_jax.serving.speculation import (AdaptivePolicy, FixedPolicy, acceptance_evidence, alpha_of,
                                            draft_options, expected_tokens, heads_tau, make_policy, tree_prior)
from quasar_jax.speculative.drafters import NGramDrafter, NGramTreeDrafter, NoDrafter, QSpecDrafter, make_drafter
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.s4c import TreeShape
from quasar_jax.speculative.sampling import RowSampling, SamplingParams
from quasar_jax.weights.loading import load_model

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11, 12],
           [40, 3, 77, 21, 9, 60, 2, 15, 88], [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1], [50]]
BUDGETS = [20, 13, 17, 24, 9]
S = 96


@pytest.fixture(scope="module")
def model(hf_tiny):
    return load_model(hf_tiny(False, 2)[0], dtype=jnp.float32)


@pytest.fixture(scope="module")
def offline(model):
    """Each prompt alone through ``Engine.generate`` (autoregressive, greedy): the reference."""
    engine = Engine(model)
    return [engine.generate([p], GenerationConfig(max_new_tokens=n, drafter="none", max_len=S)).tokens[0]
            for p, n in zip(PROMPTS, BUDGETS)]


@pytest.fixture(scope="module")
def tree_slots(model):
    """Chunk programs for K = 0, a chain of 3 and a tree of depth 3 (what auto compiles for a tree)."""
    drafters = draft_options(make_drafter("ngram", num_draft=3, num_candidates=2), "auto")
    return SlotEngine(model, drafters, "float", slots=3, max_len=S, chunk_steps=3, prefill_buckets=(8,))


def _requests(**kw):
    return [Request(prompt=p, max_tokens=n, **kw) for p, n in zip(PROMPTS, BUDGETS)]


def test_forced_switching_between_draft_lengths_is_lossless(tree_slots, offline):
    assert tree_slots.ks == (0, 3, 3) and isinstance(tree_slots.drafters[2], NGramTreeDrafter)
    policy = CyclingPolicy(3)
    scheduler = Scheduler(tree_slots, policy=policy).start()  # 5 requests, 3 slots: some wait
    try:
        got, ends = run_requests(scheduler, _requests())
    finally:
        scheduler.stop()
    assert got == offline
    assert [e.reason for e in ends] == ["length"] * 5 and set(policy.used) == {0, 1, 2}


def test_lockstep_leader_on_one_process_is_lossless(tree_slots, offline):
    """The multi-host protocol end to end on one process: every call encoded, exchanged (an
    all-reduce over one process), decoded and run; a buffer of 640 words (one admission with its
    per-row settings, EXTEND ops of 10 tokens) makes prompts and ops span several exchanges."""
    leader = lockstep.Leader(tree_slots, words=640, peer_timeout=120)
    assert leader.heartbeat_s == 1.0 and leader.ks == tree_slots.ks
    scheduler = Scheduler(leader, policy=CyclingPolicy(3)).start()
    try:
        got, _ = run_requests(scheduler, _requests())
    finally:
        scheduler.stop()
    assert got == offline
    assert leader.chunks > 0 and leader.last != 0


def test_free_slots_never_change_a_live_row(model, offline):
    """A greedy and a sampled row with free slots around them: the same tokens whatever the free
    slots hold (settings that would flip sampling: temperature -1 or NaN, top-k < 0, top-p 0, and
    NaN / huge penalties, logit bias, min_tokens, logprobs, token counts)."""
    engine = SlotEngine(model, NGramDrafter(3), "float", slots=4, max_len=S, chunk_steps=4, prefill_buckets=(8,))
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7)

    def run(poison: bool) -> dict:
        engine.reset()
        if poison:
            st = engine.state
            bias = jnp.zeros_like(st.rows.bias_ids).at[:, :4].set(jnp.array([0, 1, 2, 3]))
            rows = dataclasses.replace(  # the logits stage's settings too: penalties, bias, min_tokens, logprobs
                st.rows, temperature=jnp.array([-1.0, 0.0, jnp.nan, 0.0]), top_k=jnp.array([-7, 0, 3, 0]),
                top_p=jnp.array([0.0, 1.0, 0.3, 1.0]), min_p=jnp.array([jnp.nan, 0.0, 0.9, 0.0]),
                presence_penalty=jnp.array([jnp.nan, 0.0, 50.0, 0.0]), repetition_penalty=jnp.array([0.0, 1.0, -2.0, 1.0]),
                frequency_penalty=jnp.array([1e9, 0.0, -1e9, 0.0]), min_tokens=jnp.array([10**6, 0, 10**6, 0], jnp.int32),
                bias_ids=bias, bias_values=jnp.full(bias.shape, jnp.nan), logprobs=jnp.array([20, -1, 7, -1], jnp.int32))
            loop = dataclasses.replace(st.loop, history=jax.random.randint(jax.random.key(3), (4, S), 0, 96),
                                       new_tokens=jnp.array([5, 0, 9, 0], jnp.int32),
                                       keys=jax.random.split(jax.random.key(99), 4),
                                       counts=jnp.full_like(st.loop.counts, 7),
                                       prompt_ids=jnp.ones_like(st.loop.prompt_ids))
            engine.state = dataclasses.replace(st, loop=loop, rows=rows, max_new=jnp.array([-3, 1, 10**6, 1]))
        for slot, (prompt, params) in ((1, (PROMPTS[0], greedy)), (3, (PROMPTS[1], sampled))):
            stage_prompt(engine, prompt)
            engine.admit(slot, engine.row_inputs(20, (), params), engine.key_data(params, 0))
        out = {1: [], 3: []}
        for _ in range(40):
            res = engine.chunk()
            for slot in out:
                out[slot] += res.tokens[slot, :res.appended[slot]].tolist()
            if res.done[[1, 3]].all():
                return out
        raise AssertionError("the rows did not finish")

    clean, poisoned = run(False), run(True)
    assert clean == poisoned
    assert clean[1] == offline[0] and len(clean[3]) == 20


# ----------------------------------------------------------------------------- the policy
def test_expected_tokens_and_its_inverse():
    assert expected_tokens(0, 0.9) == 1.0 and expected_tokens(5, 1.0) == 6.0
    assert math.isclose(expected_tokens(2, 0.5), 1 + 0.5 + 0.25)
    for k, a in ((1, 0.3), (5, 0.7), (3, 0.95)):
        assert abs(alpha_of(expected_tokens(k, a), k) - a) < 1e-6
    assert alpha_of(0.5, 3) == pytest.approx(0.0, abs=1e-6) and alpha_of(9.0, 3) == pytest.approx(1.0, abs=1e-6)


def test_draft_options():
    assert draft_options(NGramDrafter(5), "auto") == (NoDrafter(), NGramDrafter(2), NGramDrafter(5))
    assert draft_options(NGramDrafter(2), "auto") == (NoDrafter(), NGramDrafter(2))
    assert draft_options(QSpecDrafter(4), "auto") == (NoDrafter(), QSpecDrafter(2), QSpecDrafter(4))
    assert draft_options(NGramDrafter(5), 0) == draft_options(NGramDrafter(5), "off") == (NoDrafter(),)
    assert draft_options(NGramDrafter(5), "3") == (NGramDrafter(3),)
    assert draft_options(NoDrafter(), "auto") == (NoDrafter(),)
    with pytest.raises(ValueError, match="speculation must be auto, off or a draft length"):
        draft_options(NGramDrafter(5), "sometimes")


def _policy(step_ar=1.0, step_spec=2.0, **kw):
    """K = 0 and K = 5; seconds per step flat in the busy rows."""
    return AdaptivePolicy([0, 5], [False, False], [(step_ar, step_ar), (step_spec, step_spec)], 16, **kw)


def _observe_tau(policy, program, tau, steps=10, step_s=None):
    busy = 4
    step = step_s if step_s is not None else policy.step_time(program, busy)
    policy.observe(program, busy, step * steps, steps, int(round(tau * steps * busy)), steps * busy)


def test_policy_probes_then_keeps_ar_when_drafts_do_not_pay():
    policy = _policy(step_ar=1.0, step_spec=3.0)  # a 6-token step costs 3 one-token steps
    assert policy.choose(4) == 1  # alpha unknown: the first chunk probes the largest K
    _observe_tau(policy, 1, 1.5)  # alpha ~ 0.33: E ~ 1.5 < 3
    chosen = []
    for _ in range(80):
        chosen.append(policy.choose(4))
        _observe_tau(policy, chosen[-1], 1.5 if chosen[-1] == 1 else 1.0)
    probes = [-1] + [i for i, p in enumerate(chosen) if p == 1]
    assert probes == [-1, 16, 49]  # one chunk in 17, then in 33: the probes back off (to 1 in 129)
    assert policy.switches == 0 and policy.current == 0


def test_policy_switches_to_speculation_with_hysteresis():
    policy = _policy(step_ar=1.0, step_spec=1.5)
    assert policy.choose(4) == 1
    _observe_tau(policy, 1, 4.5)  # alpha ~ 0.85: E(5) ~ 4 tokens for 1.5x the time
    seen = [policy.choose(4) for _ in range(3)]
    assert seen == [0, 0, 1]  # patience: three agreeing decisions before the switch
    assert policy.switches == 1
    for _ in range(20):  # acceptance collapses: back to AR, again after `patience` chunks
        _observe_tau(policy, policy.choose(4), 1.0)
    assert policy.current == 0 and policy.switches == 2


def test_policy_does_not_thrash_near_the_threshold():
    policy = _policy(step_ar=1.0, step_spec=2.0, alpha=0.5)  # E(5, 0.5) ~ 1.97 vs 2x the time: a tie
    policy.since_alpha = 0
    choices = []
    for i in range(60):  # acceptance wobbles around the break-even point
        p = policy.choose(4)
        choices.append(p)
        _observe_tau(policy, p, 2.05 if i % 2 else 1.9) if p == 1 else _observe_tau(policy, p, 1.0)
    assert policy.switches == 0


def test_acceptance_evidence_leaves_out_each_rows_first_step():
    """Slot 0 started before this chunk, slot 1 takes its first step here (3 tokens, drafts from
    the prompt alone), slot 2 is free: the evidence is slot 0's steps and slot 1's later one."""
    emits = np.array([[2, 3, 0], [1, 2, 0], [0, 0, 0]], np.int32)  # [N, B]
    res = types.SimpleNamespace(emits=emits, appended=emits.sum(0), steps=np.array([7, 2, 0]),
                                row_steps=int(np.sum(emits > 0)))
    assert acceptance_evidence(res, [0, 1]) == (2 + 1 + 2, 3)
    assert acceptance_evidence(res, [0]) == (8, 4)  # a row not given is counted whole


def test_alpha_weighs_evidence_by_row_steps_with_a_half_life():
    """A start-up ramp of young rows (four one-step chunks at tau 1.0, as logged at concurrency 16)
    moves alpha from its prior 0.5 to ~0.35, not to ~0.15 as a per-chunk average did; steady
    evidence then takes over within a few half-lives."""
    policy = AdaptivePolicy([0, 2], [False, False], [(1.0, 1.0), (1.4, 1.4)], 16)
    for rows in (11, 13, 15, 16):
        policy.observe(1, rows, 1.4, 1, rows, rows)
    assert 0.3 < policy.alpha < 0.4
    assert policy.rate(0, 16) < (1 + policy.margin) * policy.rate(1, 16)  # no case for leaving K = 2
    for _ in range(16):
        policy.observe(1, 16, 11.2, 8, int(round(expected_tokens(2, 0.45) * 128)), 128)
    assert abs(policy.alpha - 0.45) < 0.01


def test_policy_follows_the_machine_but_keeps_the_calibrated_ratios():
    policy = _policy(step_ar=1.0, step_spec=2.0)
    for _ in range(30):
        _observe_tau(policy, 1, 2.0, step_s=6.0)  # the machine got 3x slower
    assert 5.5 < policy.step_time(1, 4) < 6.1
    assert policy.step_time(1, 4) / policy.step_time(0, 4) == pytest.approx(2.0)


def _tree_policy(tree_step, prior):
    """AR, chains K = 2 and 5, and a K = 5 tree (the layout of ``draft_options`` for a tree drafter)."""
    return AdaptivePolicy([0, 2, 5, 5], [False, False, False, True],
                          [(1.0, 1.0), (1.2, 1.2), (1.5, 1.5), (tree_step, tree_step)], 16, priors=[None] * 3 + [prior])


def _run_policy(policy, taus, chunks):
    """``chunks`` choices, each observed at ``taus[program]``; the programs run."""
    ran = []
    for _ in range(chunks):
        p = policy.choose(4)
        ran.append(p)
        _observe_tau(policy, p, taus[p])
    return ran


def test_policy_finds_a_tree_that_pays_from_a_pessimistic_prior():
    """The tree's prior (1.5 tokens per step) says it loses; its probe shows tau 3.0 for 1.6x AR's
    step (the chains: alpha 0.4), so it is chosen within a few chunks and kept."""
    policy = _tree_policy(1.6, 1.5)
    taus = [1.0, expected_tokens(2, 0.4), expected_tokens(5, 0.4), 3.0]
    ran = _run_policy(policy, taus, 60)
    assert ran[:2] == [1, 3]  # the cheapest chain measures alpha, then the tree is probed
    first = next(i for i, _ in enumerate(ran) if policy.current == 3 and all(p == 3 for p in ran[i:i + 5]))
    assert first <= 8, ran
    assert policy.current == 3 and ran[-20:].count(3) >= 18  # kept (the chains are probed now and then)


def test_policy_never_keeps_a_tree_that_does_not_pay():
    """An optimistic prior (4 tokens per step) for a tree that gives 2.0 at 6x AR's step: one probe
    replaces the prior, later probes back off, and the tree never becomes the program."""
    policy = _tree_policy(6.0, 4.0)
    taus = [1.0, expected_tokens(2, 0.3), expected_tokens(5, 0.3), 2.0]
    ran = []
    for _ in range(300):
        ran += _run_policy(policy, taus, 1)
        assert policy.current != 3
    assert 1 <= ran.count(3) <= 6  # probes at chunk 2, then every 16, 32, 64, 128 chunks


def test_tree_prior_from_the_heads_recorded_acceptance():
    """1 + the sum over nodes of the product along the path, against enumerating the outcomes."""
    acc = [[0.5, 0.2, 0.1], [0.4, 0.3]]
    tree = TreeShape(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)))
    drafter = types.SimpleNamespace(heads=types.SimpleNamespace(meta={"acceptance": {"top_rank": acc}}), tree=tree,
                                    num_draft=2, num_candidates=0)
    # brute force: depth 1 accepts rank r with acc[0][r] (disjoint); depth 2 then accepts its child's rank
    expected = 1.0
    for r1, p1 in enumerate(acc[0]):
        children = [p[1] for p in tree.paths if len(p) == 2 and p[0] == r1]
        expected += p1 * (1 + sum(acc[1][r2] for r2 in children)) if (r1,) in tree.paths else 0.0
    assert heads_tau(drafter) == pytest.approx(expected)
    assert tree_prior(drafter, 0.9) == pytest.approx(expected)  # heads alone: the chain's alpha plays no part
    drafter.num_candidates = 1
    assert tree_prior(drafter, 0.9) == pytest.approx(expected_tokens(2, 0.9))  # the merged chain promises more
    assert heads_tau(NGramTreeDrafter(5, 3)) is None


def test_make_policy_fixed_for_one_program():
    engine = types.SimpleNamespace(ks=(5,), drafters=(NGramDrafter(5),), b=4)
    assert isinstance(make_policy(engine, "auto"), FixedPolicy)
    engine = types.SimpleNamespace(ks=(0, 2, 5), drafters=(NoDrafter(), NGramDrafter(2), NGramDrafter(5)), b=4)
    assert isinstance(make_policy(engine, "auto", calibration=[(1, 1)] * 3), AdaptivePolicy)
    assert isinstance(make_policy(engine, 5), FixedPolicy)


# ----------------------------------------------------------------------------- the codec
def test_codec_round_trip_and_buffer_bound():
    engine = SlotEngine.__new__(SlotEngine)  # only the specs are needed
    engine.b = 6
    engine.row_spec = {"max_new": jax.ShapeDtypeStruct((), jnp.int32), "stop": jax.ShapeDtypeStruct((3,), jnp.int32),
                       "rows": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                            RowSampling.abstract(1))}
    engine.key_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)
    codec = lockstep.Codec(engine, words=2048)
    sampling = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, presence_penalty=0.5,
                              frequency_penalty=-0.25, repetition_penalty=1.2, min_tokens=4,
                              logit_bias={17: -100.0, 3: 2.5}, logprobs=5)
    row = {"max_new": np.int32(7), "stop": np.array([3, -1, -1], np.int32),
           "rows": jax.tree.map(lambda x: np.asarray(x)[0], RowSampling.of([sampling]))}
    ops = [(lockstep.Op.ADMIT, (np.int32(2), row, np.array([1, 2**32 - 1], np.uint32))),
           (lockstep.Op.FINISH, (np.array([1, 0, 0, 1, 0, 1], bool),)),
           (lockstep.Op.PREFILL, (np.int32(8), np.int32(32), np.int32(1))),
           (lockstep.Op.CHUNK, (np.int32(2), np.int32(1))), (lockstep.Op.RESET, ())]
    buffer = np.zeros((2048,), np.int32)
    words = np.concatenate([codec.encode(op, args) for op, args in ops])
    buffer[:len(words)] = words
    back = codec.decode(buffer)
    assert [op for op, _ in back] == [op for op, _ in ops]
    for (_, a), (_, b) in zip(back, ops):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
            assert np.asarray(x).dtype == np.asarray(y).dtype
    with pytest.raises(ValueError, match="cannot hold one op"):
        lockstep.Codec(engine, words=600)  # an ADMIT op needs 618 words (600 of them the logit bias)


def test_lockstep_ends_the_group_on_divergence_or_a_lost_peer(tree_slots):
    leader = lockstep.Leader(tree_slots, words=4096, peer_timeout=120, heartbeat_s=0.0)
    leader.exchange = lambda buffer, status: (buffer, np.array([[3, 0x1234], [3, 0x5678]], np.int32))
    with pytest.raises(lockstep.GroupLost, match=r"process 1 diverged at chunk 3: its tokens \(digest 0x5678"):
        leader.flush()

    def broken(buffer, status):
        raise RuntimeError("Gloo all-reduce failed: Connection reset by peer\nmore")
    leader.exchange = broken
    with pytest.raises(lockstep.GroupLost, match="lost contact with the other processes.*Connection reset by peer"):
        leader.flush()


def test_watchdog_ends_a_hung_process_with_one_line():
    probe = ("import time\nfrom quasar_jax.serving.lockstep import Watchdog\n"
             "with Watchdog('prog').guard('the exchange', 0.5):\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == lockstep.EXIT_GROUP_LOST
    assert proc.stderr.strip().splitlines() == [
        "prog: process 0: no answer from the other processes for too long in the exchange: a peer is gone or "
        "hangs; ending the group"]
