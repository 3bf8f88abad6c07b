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

_MODULES = {  # public name -> the module that defines it
    "quasar_jax.model.config": ("Qwen3Config",),
    "quasar_jax.model.qwen3": ("Qwen3", "forward"),
    "quasar_jax.model.kv_cache": ("KVCache",),
    "quasar_jax.model.modes": ("Backend", "QuantMode"),
    "quasar_jax.weights.loading": ("load", "load_model", "load_tokenizer", "save_pretrained"),
    "quasar_jax.sharding": ("make_mesh", "memory_plan"),
    "quasar_jax.speculative.drafters": ("Drafter", "DrafterKind", "NGramDrafter", "NoDrafter", "QSpecDrafter"),
    "quasar_jax.speculative.heads": ("DraftHeads", "load_heads"),
    "quasar_jax.speculative.s4c": ("S4CDrafter",),
    "quasar_jax.speculative.sampling": ("SamplingParams",),
    "quasar_jax.speculative.engine": ("Engine", "GenerationConfig", "generate"),
    "quasar_jax.speculative.results": ("BatchStats", "FinishReason", "GenerationResult", "RowStats"),
    "quasar_jax.cli.errors": ("InputError",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

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
