"""quasar_jax: quantized self-speculative decoding (Quasar, QSpec) for Qwen3 in JAX/Flax.

Public API::

    import quasar_jax as qj
    model, tokenizer = qj.load("demo")                 # or a local HF dir / hub id, dtype=...
    engine = qj.Engine(model)
    result = engine.generate([tokenizer("def f(x):")["input_ids"]],
                             qj.GenerationConfig(max_new_tokens=64, drafter="ngram"))
    print(tokenizer.decode(result.tokens[0]), result.batch_stats)
"""

import warnings as _warnings

_warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"aqt(\..*)?")

from quasar_jax.config import Qwen3Config  # noqa: E402
from quasar_jax.drafters import Drafter, DrafterKind, NGramDrafter, NoDrafter, QSpecDrafter  # noqa: E402
from quasar_jax.engine import (BatchStats, Engine, FinishReason, GenerationConfig, GenerationResult,  # noqa: E402
                               RowStats, generate)
from quasar_jax.modes import Backend, QuantMode  # noqa: E402
from quasar_jax.sampling import SamplingParams  # noqa: E402
from quasar_jax.kv_cache import KVCache  # noqa: E402
from quasar_jax.loading import load, load_model, load_tokenizer, save_pretrained  # noqa: E402
from quasar_jax.model import Qwen3, forward  # noqa: E402

__all__ = ["Backend", "BatchStats", "Drafter", "DrafterKind", "Engine", "FinishReason", "GenerationConfig",
           "GenerationResult", "KVCache", "NGramDrafter", "NoDrafter", "QSpecDrafter", "QuantMode", "Qwen3",
           "Qwen3Config", "RowStats", "SamplingParams", "forward", "generate", "load", "load_model",
           "load_tokenizer", "save_pretrained"]
__version__ = "0.1.0"
