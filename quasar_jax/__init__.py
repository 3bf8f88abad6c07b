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
from quasar_jax.engine import Engine, GenerationConfig, GenerationResult, generate  # noqa: E402
from quasar_jax.kv_cache import KVCache  # noqa: E402
from quasar_jax.loading import load, load_model, load_tokenizer, save_pretrained  # noqa: E402
from quasar_jax.model import Qwen3, forward  # noqa: E402

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "KVCache", "Qwen3", "Qwen3Config",
           "forward", "generate", "load", "load_model", "load_tokenizer", "save_pretrained"]
__version__ = "0.1.0"
