"""Tests for quasar_jax.speculative.ngram.ngram_draft against a plain-Python reference of the same rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quasar_jax.speculative.ngram import ngram_draft, ngram_draft_jit

B, S = 3, 24  # fixed shapes so each config compiles once


def reference_draft(
    tokens: list[int], *, num_draft: int, ngram_min: int, ngram_max: int, prefer: str
) -> list[int]:
    """Plain-Python drafter for ONE row; `tokens` holds only the valid history."""
    length = len(tokens)
    for n in range(ngram_max, ngram_min - 1, -1):
        if length < n + 1:
            continue
        suffix = tokens[length - n :]
        starts = [i for i in range(0, length - n) if tokens[i : i + n] == suffix]
        if starts:
            i = max(starts) if prefer == "recent" else min(starts)
            return tokens[i + n : min(i + n + num_draft, length)]
    return []


def run_and_compare(history: np.ndarray, lengths: np.ndarray, **kw) -> None:
    draft, n_draft = ngram_draft_jit(history, lengths, **kw)
    draft, n_draft = np.asarray(draft), np.asarray(n_draft)
    assert draft.shape == (history.shape[0], kw["num_draft"]) and draft.dtype == np.int32
    assert n_draft.shape == (history.shape[0],) and n_draft.dtype == np.int32
    for b in range(history.shape[0]):
        want = reference_draft(list(history[b, : lengths[b]]), **kw)
        assert n_draft[b] == len(want), (b, history[b, : lengths[b]], want, draft[b])
        assert list(draft[b, : n_draft[b]]) == want
        assert not draft[b, n_draft[b] :].any()  # padding of the draft is 0


@st.composite
def histories(draw):
    vocab = draw(st.integers(2, 5))
    rows = draw(
        st.lists(
            st.lists(st.integers(0, vocab - 1), min_size=S, max_size=S), min_size=B, max_size=B
        )
    )
    lengths = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    return np.asarray(rows, dtype=np.int32), np.asarray(lengths, dtype=np.int32)


CONFIGS = [
    dict(num_draft=1, ngram_min=1, ngram_max=1),
    dict(num_draft=4, ngram_min=1, ngram_max=3),
    dict(num_draft=5, ngram_min=2, ngram_max=4),
    dict(num_draft=8, ngram_min=3, ngram_max=3),
]


@pytest.mark.parametrize("prefer", ["recent", "earliest"])
@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: "K{num_draft}_n{ngram_min}-{ngram_max}".format(**c)
)
@settings(max_examples=60, deadline=None)
@given(data=histories())
def test_matches_reference(data, cfg, prefer):
    history, lengths = data
    run_and_compare(history, lengths, prefer=prefer, **cfg)


def test_simple_cases():
    #              0  1  2  3  4  5  6  7
    row = np.array([5, 6, 7, 8, 5, 6, 9, 5, 6], dtype=np.int32)
    history = np.zeros((2, 12), dtype=np.int32)
    history[0, :9] = row
    history[1, :9] = row
    lengths = np.array([9, 9], dtype=np.int32)
    # suffix [5, 6]: starts 0 and 4 -> recent proposes [9, 5, 6], earliest [7, 8, 5, 6].
    draft, n = ngram_draft(history, lengths, num_draft=4, ngram_min=1, ngram_max=2, prefer="recent")
    assert list(np.asarray(n)) == [3, 3]
    assert list(np.asarray(draft)[0]) == [9, 5, 6, 0]
    draft, n = ngram_draft(
        history, lengths, num_draft=4, ngram_min=1, ngram_max=2, prefer="earliest"
    )
    assert list(np.asarray(n)) == [4, 4]
    assert list(np.asarray(draft)[0]) == [7, 8, 5, 6]


def test_larger_ngram_wins():
    # suffix 1-gram [3] most recently at index 3 (-> 0); 2-gram [2, 3] only at index 0 (-> 9).
    row = [2, 3, 9, 3, 0, 2, 3]
    history = np.array([row], dtype=np.int32)
    draft, n = ngram_draft(history, np.array([7]), num_draft=2, ngram_min=1, ngram_max=2)
    assert int(n[0]) == 2 and list(np.asarray(draft)[0]) == [9, 3]
    draft, n = ngram_draft(history, np.array([7]), num_draft=2, ngram_min=1, ngram_max=1)
    assert int(n[0]) == 2 and list(np.asarray(draft)[0]) == [0, 2]


def test_no_match_gives_zero():
    history = np.array([[0, 1, 2, 3, 4, 5], [7, 7, 7, 7, 7, 7], [1, 1, 1, 1, 1, 1]], np.int32)
    lengths = np.array([6, 1, 0], dtype=np.int32)  # distinct tokens; too short; empty
    draft, n = ngram_draft(history, lengths, num_draft=3)
    assert list(np.asarray(n)) == [0, 0, 0]
    assert not np.asarray(draft).any()


def test_padding_is_never_read():
    # Valid part has no earlier occurrence of its last token 4; the padding is full of 4s and of
    # the suffix pattern, so any read of it would produce a match or a proposal.
    valid = [1, 2, 3, 4]
    history = np.array([valid + [4, 3, 4, 4, 3, 4, 4, 4]], dtype=np.int32)
    for prefer in ("recent", "earliest"):
        draft, n = ngram_draft(history, np.array([4]), num_draft=4, prefer=prefer)
        assert int(n[0]) == 0 and not np.asarray(draft).any()
    # A match whose continuation reaches the end of the valid region is cut at `lengths`.
    history = np.array([[1, 2, 1, 2, 1, 9, 9, 9, 9]], dtype=np.int32)
    draft, n = ngram_draft(history, np.array([5]), num_draft=4, ngram_min=1, ngram_max=3)
    # suffix [1, 2, 1] at 0 -> proposes history[3:5] = [2, 1] only, not the 9s.
    assert int(n[0]) == 2 and list(np.asarray(draft)[0]) == [2, 1, 0, 0]


def test_full_length_rows():
    rng = np.random.default_rng(0)
    history = rng.integers(0, 3, size=(B, S)).astype(np.int32)
    full = np.full((B,), S, np.int32)
    run_and_compare(history, full, num_draft=4, ngram_min=1, ngram_max=3, prefer="recent")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_draft=0), "num_draft"),
        (dict(num_draft=2, ngram_min=0), "ngram_min"),
        (dict(num_draft=2, ngram_min=3, ngram_max=2), "ngram_min"),
        (dict(num_draft=2, prefer="latest"), "prefer"),
    ],
)
def test_bad_args(kwargs, match):
    history = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match=match):
        ngram_draft(history, np.array([4]), **kwargs)
    with pytest.raises(ValueError, match=match):
        ngram_draft_jit(history, np.array([4]), **kwargs)
