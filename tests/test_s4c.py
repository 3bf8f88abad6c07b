"""S4C: draft heads, the heads' tree (vs plain-Python references), the carried hidden state, and
the drafter in the fused loop: lossless greedy (float32, w8a16; batch 1 and ragged), exact sampling,
serving slots, configuration errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_heads
from quasar_jax.cli.errors import InputError
from quasar_jax.speculative.drafters import make_drafter
from quasar_jax.speculative.engine import Engine, GenerationConfig, make_program
from quasar_jax.speculative.features import program_params
from quasar_jax.speculative.heads import DraftHeads, head_logits
from quasar_jax.speculative.s4c import S4CDrafter, TreeShape, choose_tree, grow_tree
from quasar_jax.speculative.sampling import GreedySampler, RowSampling, SamplingParams, row_keys
from quasar_jax.weights.loading import load_model
from test_engine import PROMPTS, _next_token_probs
from test_tree_engine import check_first_token


@pytest.fixture(scope="module")
def engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], dtype=jnp.float32))


@pytest.fixture(scope="module")
def heads(engine):
    return random_heads(engine.model, num_heads=3)


@pytest.fixture(scope="module")
def ar_tokens(engine):
    return engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, drafter="none")).tokens


_FORWARDS = {}  # id(model) -> (params, compiled plain forward of PAD tokens)
PAD = 64


def _forward(model, rows):
    """Logits and hidden states of each row alone (plain causal forward; the row is right-padded to
    PAD tokens, which causal attention keeps from changing its own positions: one compile)."""
    if id(model) not in _FORWARDS:
        graphdef, params = nnx.split(model)
        cache, pos = model.init_cache(1, PAD), jnp.arange(PAD, dtype=jnp.int32)[None]
        _FORWARDS[id(model)] = params, jax.jit(
            lambda p, ids: nnx.merge(graphdef, p)(ids, pos, cache, return_hidden=True))
    params, fwd = _FORWARDS[id(model)]
    out = []
    for r in rows:
        ids = np.zeros((1, PAD), np.int32)
        ids[0, :len(r)] = r
        logits, _, hidden = fwd(params, jnp.asarray(ids))
        out.append((np.asarray(logits[0, :len(r)]), np.asarray(hidden[0, :len(r)])))
    return out


# ----------------------------------------------------------------------------- heads
def test_hidden_is_the_lm_head_input_and_heads_shapes(engine):
    model = engine.model
    (logits, hidden), = _forward(model, [PROMPTS[2]])
    assert hidden.shape == (len(PROMPTS[2]), model.config.hidden_size)
    np.testing.assert_allclose(np.asarray(model.lm_logits(jnp.asarray(hidden))), logits, atol=1e-5)
    heads = DraftHeads(4, model.config.hidden_size, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([PROMPTS[2], PROMPTS[2][::-1]], jnp.int32)
    h = jnp.stack([jnp.asarray(hidden)] * 2)
    out = heads.unroll(model, h, tokens)
    assert len(out) == 4 and all(o.shape == (2, 9, model.config.vocab_size) for o in out)
    # W_out starts at zero: an untrained head predicts what the target predicts next.
    for o in out:
        np.testing.assert_allclose(np.asarray(o[0]), logits, atol=1e-5)
    feat = heads.blocks[0](h[:, :3], model.embed(tokens[:, :3]))
    assert feat.shape == (2, 3, model.config.hidden_size) and feat.dtype == jnp.float32


# ----------------------------------------------------------------------------- the tree
def test_choose_tree_is_the_best_paths_by_estimate():
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.01, 0.6, size=(3, 4))
    got = choose_tree(acc, 20)
    every = [p for d in range(1, 4) for p in itertools.product(range(4), repeat=d)]
    est = {p: float(np.prod([acc[d, r] for d, r in enumerate(p)])) for p in every}
    want = sorted(every, key=lambda p: -est[p])[:20]
    assert [p for p, _ in got] == want
    assert np.allclose([e for _, e in got], [est[p] for p in want])
    shape = TreeShape.from_ranked([p for p, _ in got], 8, max_depth=2)  # any leading part is a tree
    assert shape.paths == tuple(sorted([p for p in want if len(p) <= 2][:8], key=len))
    index = {p: i for i, p in enumerate(shape.paths)}
    assert shape.parent.tolist() == [index.get(p[:-1], -1) for p in shape.paths]
    leaves = {tuple(shape.paths[i] for i in row if i >= 0)[-1] for row in shape.leaf_paths()}
    assert leaves == {p for p in shape.paths if not any(q[:-1] == p for q in shape.paths)}
    with pytest.raises(ValueError, match="parent"):
        TreeShape(((0,), (1, 0)))


def _ref_grow(heads, model, shape, hidden, last):
    """Plain Python: every node on its own, from its parent's feature and token."""
    feat, tok, out = {(): hidden}, {(): last}, []
    for path in shape.paths:
        parent = path[:-1]
        f = heads.blocks[len(path) - 1](feat[parent][None], model.embed(jnp.asarray([tok[parent]])))[0]
        logits = np.asarray(head_logits(model, f))
        tok[path] = int(np.argsort(-logits, kind="stable")[path[-1]])
        feat[path] = f
        out.append(tok[path])
    return out


def test_grow_tree_matches_plain_python(engine, heads):
    model = engine.model
    module = heads.module()
    shape = TreeShape.from_ranked(heads.meta["tree"]["paths"], 14)
    hidden = jax.random.normal(jax.random.key(3), (2, model.config.hidden_size))
    last = jnp.asarray([7, 50], jnp.int32)
    got = np.asarray(jax.jit(lambda h, t: grow_tree(module, model, shape, h, t))(hidden, last))
    for b in range(2):
        assert got[b].tolist() == _ref_grow(module, model, shape, hidden[b], int(last[b]))


def _token_paths(tree, b):
    """Set of root-to-node token sequences of row b of a TreeDraft."""
    toks, par, out = np.asarray(tree.tokens[b]), np.asarray(tree.parent[b]), set()
    for i in range(int(tree.n_nodes[b])):
        seq, j = [], i
        while j >= 0:
            seq.append(int(toks[j]))
            j = int(par[j])
        out.add(tuple(seq[::-1]))
    return out


def test_ngram_candidates_join_the_heads_tree(engine, heads):
    model = engine.model
    drafter = make_drafter("s4c", heads=heads, num_draft=3, num_candidates=1, tree_nodes=8)
    history = jnp.asarray([PROMPTS[0] + [0] * 7, PROMPTS[2] + [0] * 11], jnp.int32)
    lengths = jnp.asarray([13, 9], jnp.int32)
    hidden = jax.random.normal(jax.random.key(4), (2, model.config.hidden_size))
    bound = drafter.bind(hidden, drafter.program_params(nnx.split(model)[1]))
    tree, _ = bound.draft_tree(model, history, lengths, None)
    alone = grow_tree(heads.module(), model, drafter.tree, hidden, jnp.asarray([7, 88]))
    shape = drafter.tree
    assert tree.num_nodes == drafter.num_nodes == 8 + 3
    for b in range(2):
        heads_paths = {tuple(int(alone[b, shape.paths.index(p[:d + 1])]) for d in range(len(p))) for p in shape.paths}
        ngram = {(8,), (8, 9), (8, 9, 5)} if b == 0 else set()  # REPETITIVE: "5 6 7" -> 8 9 5; row 1: none
        assert _token_paths(tree, b) == heads_paths | ngram


# ----------------------------------------------------------------------------- the carried hidden state
def test_carried_hidden_state_is_that_of_position_lengths_minus_2(engine, heads):
    """After steps of the S4C program, then of the n-gram chain and AR programs over the same
    state, ``hidden`` equals a plain forward's hidden state at lengths - 2 (ragged rows)."""
    model = engine.model
    graphdef, params = nnx.split(model)
    s4c = make_drafter("s4c", heads=heads, num_draft=3, num_candidates=0)
    rows = [SamplingParams()] * 3
    init, step, _ = make_program(graphdef, s4c, GreedySampler(), "float")
    _, step_chain, _ = make_program(graphdef, make_drafter("ngram", num_draft=3), GreedySampler(), "float")
    _, step_ar, _ = make_program(graphdef, make_drafter("none"), GreedySampler(), "float")
    prompt = np.zeros((3, 17), np.int32)
    lens = [13, 9, 17]
    for i, p in enumerate([PROMPTS[0], PROMPTS[2], PROMPTS[3]]):
        prompt[i, :len(p)] = p
    state = jax.jit(init, static_argnums=3)(program_params(params, s4c), jnp.asarray(prompt),
                                            jnp.asarray(lens, jnp.int32), 64, row_keys(rows, 0))
    args = (jnp.full((3,), 40, jnp.int32), jnp.full((3, 1), -1, jnp.int32), RowSampling.of(rows))

    def check(state):
        history, lengths = np.asarray(state.history), np.asarray(state.lengths)
        for b in range(3):
            (_, hidden), = _forward(model, [history[b, :lengths[b] - 1].tolist()])
            np.testing.assert_allclose(np.asarray(state.hidden[b]), hidden[-1], atol=2e-5)

    check(state)
    for fn, p in ((step, program_params(params, s4c)), (step_chain, params), (step_ar, params)):
        jitted = jax.jit(fn)
        for _ in range(3):
            state = jitted(p, state, *args)
        check(state)


# ----------------------------------------------------------------------------- lossless in the loop
@pytest.mark.parametrize("c", [0, 1, "chain"])
def test_greedy_s4c_equals_autoregressive(engine, heads, ar_tokens, c):
    """Heads' tree (C = 0), with an n-gram candidate joining it (C = 1), and a chain-shaped tree
    (each head's top-1 only: K nodes)."""
    if c == "chain":
        drafter = S4CDrafter(heads, TreeShape(((0,), (0, 0), (0, 0, 0))), num_draft=3)
        cfg = GenerationConfig(max_new_tokens=24, drafter=drafter)
    else:
        cfg = GenerationConfig(max_new_tokens=24, drafter="s4c", heads=heads, num_draft=3, num_candidates=c)
    res = engine.generate(PROMPTS, cfg)  # one ragged batch
    assert res.tokens == ar_tokens
    for s in res.stats:
        assert sum(s.emitted_hist) == s.verify_steps and len(s.emitted_hist) == 3 + 2
        assert sum(n * m for n, m in enumerate(s.emitted_hist)) == s.new_tokens
    if c == 1:
        for prompt, expected in zip(PROMPTS[:2], ar_tokens[:2]):  # batch 1
            assert engine.generate([prompt], cfg).tokens[0] == expected
        full = GenerationConfig(max_new_tokens=40, drafter="s4c", heads=heads, num_draft=3, max_len=30)
        ar = engine.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=40, drafter="none", max_len=30))
        assert engine.generate(PROMPTS[:2], full).tokens == ar.tokens  # nodes past a full cache


def test_greedy_s4c_equals_autoregressive_w8a16(hf_tiny):
    engine = Engine(load_model(hf_tiny(False, 2)[0], int8=True))
    heads = random_heads(engine.model, num_heads=3)
    ar = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="none", verifier="w8a16"))
    cfg = GenerationConfig(max_new_tokens=20, drafter="s4c", heads=heads, num_draft=3, verifier="w8a16")
    assert engine.generate(PROMPTS, cfg).tokens == ar.tokens
    assert engine.generate([PROMPTS[1]], cfg).tokens[0] == ar.tokens[1]


def test_s4c_sampling_matches_verifier_distribution(engine, heads):
    """First sampled token over 2000 rows vs the verifier (as test_tree_engine's n-gram test).

    The heads' root children are head 1's top tokens; the prompt is chosen so that they
    hold about half the verifier's mass, so acceptance and rejection (then the residual) both
    happen. A draft is accepted at the root exactly when the first token is one of them.
    """
    model = engine.model
    sampling = dict(temperature=1.0, top_k=8)
    drafter = make_drafter("s4c", heads=heads, num_draft=3, num_candidates=0, tree_nodes=6)
    a, rest = 50, [40, 3, 77, 21, 9, 60, 2, 15, 88]
    candidates = [[a, d] + rest + [a] for d in range(96)]
    probs = _next_token_probs(model, candidates, **sampling)
    hidden = jnp.stack([_forward(model, [c[:-1]])[0][1][-1] for c in candidates])
    roots = [i for i, path in enumerate(drafter.tree.paths) if len(path) == 1]
    children = np.asarray(grow_tree(heads.module(), model, drafter.tree, hidden,
                                    jnp.full((96,), a, jnp.int32)))[:, roots]
    mass = np.take_along_axis(probs, children, axis=1).sum(axis=1)
    d = int(np.argmin(np.abs(mass - 0.5)))
    assert 0.15 < mass[d] < 0.85
    cfg = GenerationConfig(max_new_tokens=2, drafter=drafter, seed=3, **sampling)
    check_first_token(engine, candidates[d], probs[d], cfg, root_mass=mass[d])


def test_serving_slots_with_s4c_equal_autoregressive(engine, heads, ar_tokens):
    """Slots with ``--speculation auto``'s options for S4C (K = 0, the n-gram chain, the heads'
    tree) over ONE slot state, the program switched every chunk: prefill pieces supply the hidden
    state of P-2, admit stores it, every program keeps it current."""
    from quasar_jax.serving.slots import SlotEngine, stage_prompt
    from quasar_jax.serving.speculation import draft_options

    options = draft_options(make_drafter("s4c", heads=heads, num_draft=3), "auto")
    assert [type(d).__name__ for d in options] == ["NoDrafter", "NGramDrafter", "S4CDrafter"]
    slots = SlotEngine(engine.model, options, "float", slots=2, max_len=64, chunk_steps=4, prefill_buckets=(4, 8))
    outs = {}
    for slot, i in enumerate((0, 3)):  # prompts of 13 and 17 tokens: P-2 in the last 4- or 8-piece
        prompt = PROMPTS[i]
        stage_prompt(slots, prompt)
        slots.admit(slot, slots.row_inputs(24, (), SamplingParams()), slots.key_data(SamplingParams(), 0))
        outs[slot] = []
    for chunk in itertools.count():
        res = slots.chunk((2, 0, 2, 1)[chunk % 4])
        for slot in outs:
            outs[slot] += res.tokens[slot, :res.appended[slot]].tolist()
        if res.done.all():
            break
    assert outs == {0: ar_tokens[0], 1: ar_tokens[3]}
    assert [d.tree.max_depth for d in draft_options(options[2], 2)] == [2]  # --speculation 2: the tree cut


# ----------------------------------------------------------------------------- errors
def test_s4c_configuration_errors(engine, heads, tiny_model_dir):
    with pytest.raises(ValueError, match="drafter 's4c' needs trained heads"):
        GenerationConfig(drafter="s4c")
    with pytest.raises(ValueError, match=r"num_draft must be an integer in \[1, 3\]"):
        GenerationConfig(drafter="s4c", heads=heads, num_draft=4)
    with pytest.raises(ValueError, match="tree_nodes must be an integer in"):
        GenerationConfig(drafter="s4c", heads=heads, num_draft=3, tree_nodes=999)
    with pytest.raises(ValueError, match="num_candidates must be an integer >= 1"):
        GenerationConfig(num_candidates=0)  # only s4c takes 0 n-gram candidates
    drafter = make_drafter("s4c", heads=heads, num_draft=2, tree_nodes=5)
    assert isinstance(drafter, S4CDrafter) and drafter.tree.max_depth <= 2 and drafter.num_nodes == 5 + 2
    other = Engine(load_model(tiny_model_dir))  # another vocabulary
    with pytest.raises(InputError, match="do not match the model: they were trained for vocab_size 96"):
        other.generate([[1, 2, 3]], GenerationConfig(drafter="s4c", heads=heads, num_draft=3))


def test_heads_fingerprint_covers_the_final_norm_and_lm_head(hf_tiny, heads, tmp_path):
    """Heads read the target's final norm and LM head: a model that differs only there (same
    shapes, same embedding) is refused with one line, offline and on the command line."""
    import json
    import shutil
    import subprocess
    import sys

    from quasar_jax.speculative.heads import check_model, fingerprint
    from quasar_jax.weights.loading import resolve_model_dir

    other = load_model(hf_tiny(False, 2)[0], dtype=jnp.float32)
    other.norm.scale.set_value(other.norm.scale[...] * 1.1)
    have, want = fingerprint(other), heads.meta["model"]
    assert have["embed_mean_abs"] == pytest.approx(want["embed_mean_abs"])  # the embedding alone would pass
    with pytest.raises(InputError, match="another model of the same shape \\(final norm and LM head"):
        check_model(heads.meta, other, "H")
    demo_heads = resolve_model_dir("demo") / "s4c_heads"
    assert "head_probe_std" in json.loads((demo_heads / "heads.json").read_text())["model"]
    moved = tmp_path / "heads"
    shutil.copytree(demo_heads, moved)
    meta = json.loads((moved / "heads.json").read_text())
    meta["model"]["head_probe_std"] *= 1.2  # as if trained for a fine-tune with another LM head
    (moved / "heads.json").write_text(json.dumps(meta))
    r = subprocess.run([sys.executable, "-m", "quasar_jax.decode", "--drafter", "s4c", "--heads", str(moved),
                        "--prompt", "x", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "final norm and LM head: head_probe_std" in r.stderr


def test_demo_heads_hold_their_recorded_acceptance():
    """The shipped heads on the demo model, fixed code prompts, greedy float32: lossless; the heads'
    tree alone (C = 0) reaches at least 0.9 of the tau recorded with them (estimated from their
    held-out acceptance), and with the n-gram candidate (C = 1) head nodes are accepted beyond
    what the n-gram chain alone gives."""
    import quasar_jax as qj
    from quasar_jax.speculative.heads import resolve_heads
    from quasar_jax.weights.loading import resolve_model_dir

    model, tok = qj.load("demo", dtype="float32")
    heads = resolve_heads(None, resolve_model_dir("demo"))
    prompts = [tok(p)["input_ids"] for p in (
        "def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):",
        "for i in range(10):", "    def __repr__(self):\n        return", "with open(filename) as f:",
        "# Copyright 2001 Python Software Foundation\n")]
    eng = Engine(model)
    ar = eng.generate(prompts, GenerationConfig(max_new_tokens=64, drafter="none")).tokens

    def tau(**kw):
        res = eng.generate(prompts, GenerationConfig(max_new_tokens=64, num_draft=5, **kw))
        assert res.tokens == ar
        return sum(s.new_tokens for s in res.stats) / sum(s.verify_steps for s in res.stats)

    recorded = heads.meta["tree"]["estimated_tau"]
    heads_only = tau(drafter="s4c", heads=heads, num_candidates=0)
    with_ngram, ngram = tau(drafter="s4c", heads=heads, num_candidates=1), tau(drafter="ngram")
    print(f"\ndemo heads: tau {heads_only:.2f} (recorded estimate {recorded:.2f}), with the n-gram candidate "
          f"{with_ngram:.2f}, n-gram chain alone {ngram:.2f}")
    assert heads_only >= 0.9 * recorded
    assert with_ngram >= ngram + 0.5
