"""Qwen3 dense model configuration, read from a Hugging Face ``config.json`` or a preset.

Both spellings of the RoPE base are accepted: the hub's top-level ``rope_theta`` and
transformers-5's ``rope_parameters: {rope_theta, rope_type}``. Features this implementation does
not have (sliding-window attention, RoPE scaling, attention bias, MoE) are rejected with a
``ValueError`` naming the feature instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
_PACKAGED_PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Shape and numerics of a Qwen3 dense decoder (letters as in docs/CONVENTIONS.md)."""

    vocab_size: int  # V
    hidden_size: int  # D
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # G
    head_dim: int  # E
    intermediate_size: int  # F
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:  # R
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        """Parameter count (embedding included, tied LM head counted once)."""
        d, f, e = self.hidden_size, self.intermediate_size, self.head_dim
        h, g = self.num_attention_heads, self.num_key_value_heads
        attn = d * h * e + 2 * d * g * e + h * e * d + 2 * e
        mlp = 3 * d * f
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "Qwen3Config":
        """Build from the dict of a Hugging Face ``config.json``; reject unsupported features."""
        if not isinstance(cfg, dict):
            raise ValueError(f"config must be a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"unsupported model_type {model_type!r}: only dense 'qwen3' is implemented")
        for key in ("num_experts", "num_local_experts", "moe_intermediate_size"):
            if cfg.get(key):
                raise ValueError(f"unsupported config feature: mixture of experts ({key}={cfg[key]!r})")
        if cfg.get("attention_bias"):
            raise ValueError("unsupported config feature: attention_bias=True")
        if cfg.get("use_sliding_window"):
            raise ValueError("unsupported config feature: use_sliding_window=True (sliding window attention)")
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"unsupported config feature: layer_types {sorted(set(layer_types))} "
                             "(only full_attention)")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported config feature: hidden_act={act!r} (only silu)")

        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        for source in (rope, scaling):
            rope_type = source.get("rope_type", source.get("type", "default"))
            if rope_type not in ("default", None):
                raise ValueError(f"unsupported config feature: rope scaling of type {rope_type!r}")
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise ValueError("config has neither rope_theta nor rope_parameters.rope_theta")

        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                intermediate_size=cfg["intermediate_size"],
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos,
            )
        except KeyError as err:
            raise ValueError(f"config.json is missing required field {err.args[0]!r}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        return cls.from_hf_dict(data)

    @classmethod
    def preset(cls, name: str) -> "Qwen3Config":
        """A published Qwen3 size from ``configs/``, e.g. ``"qwen3-8b"`` or ``"Qwen/Qwen3-8B"``."""
        key = name.split("/")[-1].lower()
        for directory in (PRESET_DIR, _PACKAGED_PRESET_DIR):
            path = directory / f"{key}.json"
            if path.is_file():
                return cls.from_json(path)
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a transformers-5 style ``config.json`` for this model."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
        }


def preset_names() -> list[str]:
    names = {p.stem for d in (PRESET_DIR, _PACKAGED_PRESET_DIR) if d.is_dir() for p in d.glob("*.json")}
    return sorted(names)
