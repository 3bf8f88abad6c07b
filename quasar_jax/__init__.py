"""quasar_jax: quantized self-speculative decoding (Quasar, QSpec) for Qwen3 in JAX/Flax.

Public API::

    import quasar_jax as qj
    model, tokenizer = qj.load("demo")                 # or a local HF dir / hub id, dtype=...
    engine = qj.Engine(model)
    result = engine.generate([tokenizer("def f(x):")["input_ids"]],
                             qj.GenerationConfig(max_new_tokens=64, drafter="ngram"))
    print(tokenizer.decode(result.tokens[0]), result.batch_stats)

The names below load on first use (PEP 562), so ``import quasar_jax`` and every command's
``--help`` stay fast and do not start JAX.
"""

from __future__ import annotations

import importlib
import warnings as _warnings

_warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"aqt(\..*)?")

_EXPORTS = {
    "Qwen3Config": "quasar_jax.config",
    "Drafter": "quasar_jax.drafters", "DrafterKind": "quasar_jax.drafters",
    "NGramDrafter": "quasar_jax.drafters", "NoDrafter": "quasar_jax.drafters",
    "QSpecDrafter": "quasar_jax.drafters",
    "Engine": "quasar_jax.engine", "GenerationConfig": "quasar_jax.engine", "generate": "quasar_jax.engine",
    "BatchStats": "quasar_jax.results", "FinishReason": "quasar_jax.results",
    "GenerationResult": "quasar_jax.results", "RowStats": "quasar_jax.results",
    "InputError": "quasar_jax.errors",
    "KVCache": "quasar_jax.kv_cache",
    "DraftHeads": "quasar_jax.heads", "load_heads": "quasar_jax.heads", "S4CDrafter": "quasar_jax.s4c",
    "load": "quasar_jax.loading", "load_model": "quasar_jax.loading", "load_tokenizer": "quasar_jax.loading",
    "save_pretrained": "quasar_jax.loading",
    "Qwen3": "quasar_jax.model", "forward": "quasar_jax.model",
    "Backend": "quasar_jax.modes", "QuantMode": "quasar_jax.modes",
    "SamplingParams": "quasar_jax.sampling",
    "make_mesh": "quasar_jax.sharding", "memory_plan": "quasar_jax.sharding",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quasar_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
