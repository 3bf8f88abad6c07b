"""The fidelity measurements (see the package docstring): ``fidelity`` along greedy trajectories
and the pure pooling helpers ``common_prefix``, ``ratio``, ``pool_fidelity``."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.model.modes import QuantMode
from quasar_jax.model.paged_kv_cache import CacheSpec, KVLayout
from quasar_jax.speculative.buckets import round_up


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ratio(a, b):
    """``a / b``, or None when either is missing or ``b`` is 0."""
    return None if a is None or b in (None, 0) else a / b


def fidelity(model_fp, model_q, mode: QuantMode | str, prompts_ids: Sequence[Sequence[int]],
             ar_fp_outputs: Sequence[Sequence[int]], *,
             ar_q_outputs: Sequence[Sequence[int]] | None = None, bucket: int = 32,
             kv_fp: str = "auto", kv_q: str = "auto") -> dict:
    """Float-vs-int8 fidelity along the float model's greedy trajectories.

    For each prompt, ONE teacher-forced forward of ``prompt + ar_fp_output[:-1]`` through both
    models (``model_q`` called in int8 ``mode``, w8a16 or w8a8) gives the next-token distributions at
    every generated position (n positions for n generated tokens). ``kv_fp`` / ``kv_q`` are the
    KV dtypes of the two forwards (``--kv-dtype``; int8 on pages): ``model_q`` may be the float
    model with ``mode="float"`` to measure the KV cache's quantization alone. Returns::

        top1_agreement        fraction of positions where argmax p_q == argmax p_fp (pooled)
        mean_kl               mean over positions of KL(p_fp || p_q) in nats
        mean_common_prefix    mean over prompts of the common prefix (tokens) of the int8 AR
                              output ``ar_q_outputs[i]`` and ``ar_fp_outputs[i]`` (None if not given)
        mean_ar_fp_tokens     mean length of the ar-fp outputs (scale for the prefix)
        positions, prompts    counts
        per_prompt            [{positions, agree, kl_sum, common_prefix}] for per-group pooling

    Sequences are right-padded to a multiple of ``bucket`` (fewer compiles; the padding sits after
    every scored position, so causal attention makes it irrelevant).
    """
    if len(prompts_ids) != len(ar_fp_outputs):
        raise ValueError(f"fidelity: {len(prompts_ids)} prompts but {len(ar_fp_outputs)} outputs")
    g_fp, p_fp = nnx.split(model_fp)
    g_q, p_q = nnx.split(model_q)
    quant_kw = {"mode": QuantMode.parse(mode)}

    @jax.jit
    def score(p_fp, p_q, tokens):  # tokens [1, L]
        m_fp, m_q = nnx.merge(g_fp, p_fp), nnx.merge(g_q, p_q)
        n = tokens.shape[1]
        pos = jnp.arange(n, dtype=jnp.int32)[None]
        logits_fp, _ = m_fp(tokens, pos, _cache(kv_fp, m_fp, n))
        logits_q, _ = m_q(tokens, pos, _cache(kv_q, m_q, n), **quant_kw)
        lp_fp = jax.nn.log_softmax(logits_fp[0], axis=-1)  # [L, V] float32
        lp_q = jax.nn.log_softmax(logits_q[0], axis=-1)
        kl = jnp.sum(jnp.exp(lp_fp) * (lp_fp - lp_q), axis=-1)  # [L]
        agree = jnp.argmax(logits_fp[0], axis=-1) == jnp.argmax(logits_q[0], axis=-1)
        return agree, kl

    per_prompt = []
    for i, (prompt, out) in enumerate(zip(prompts_ids, ar_fp_outputs)):
        prompt, out = list(prompt), list(out)
        if not out:
            per_prompt.append({"positions": 0, "agree": 0, "kl_sum": 0.0, "common_prefix": 0})
            continue
        seq = prompt + out[:-1]
        length = round_up(len(seq), bucket)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(seq)] = seq
        agree, kl = score(p_fp, p_q, jnp.asarray(tokens))
        lo, hi = len(prompt) - 1, len(prompt) - 1 + len(out)  # positions predicting out[0..n-1]
        agree, kl = np.asarray(agree)[lo:hi], np.asarray(kl, np.float64)[lo:hi]
        cp = common_prefix(ar_q_outputs[i], out) if ar_q_outputs is not None else None
        per_prompt.append({"positions": len(out), "agree": int(agree.sum()),
                           "kl_sum": float(kl.sum()), "common_prefix": cp})
    result = pool_fidelity(per_prompt)
    result["mean_ar_fp_tokens"] = (sum(len(o) for o in ar_fp_outputs) / len(ar_fp_outputs)
                                   if ar_fp_outputs else None)
    result["per_prompt"] = per_prompt
    return result


def _cache(kv_dtype: str, model, n: int):
    layout = KVLayout.PAGED if kv_dtype == "int8" else KVLayout.DENSE
    return CacheSpec(layout, kv_dtype=kv_dtype).init(model.config, 1, n, model.dtype)


def pool_fidelity(per_prompt: Sequence[dict]) -> dict:
    positions = sum(p["positions"] for p in per_prompt)
    prefixes = [p["common_prefix"] for p in per_prompt]
    return {"top1_agreement": ratio(sum(p["agree"] for p in per_prompt), positions),
            "mean_kl": ratio(sum(p["kl_sum"] for p in per_prompt), positions),
            "mean_common_prefix": (None if not prefixes or any(p is None for p in prefixes)
                                   else sum(prefixes) / len(prefixes)),
            "positions": positions, "prompts": len(per_prompt)}
