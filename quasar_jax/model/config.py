"""Qwen3 model configuration (dense ``qwen3`` and mixture-of-experts ``qwen3_moe``), read from a
Hugging Face ``config.json`` or a preset.

Both spellings of the RoPE base are accepted: the hub's top-level ``rope_theta`` and
transformers-5's ``rope_parameters: {rope_theta, rope_type}``; likewise both spellings of the
expert count: the hub's ``num_experts`` and transformers-5's ``num_local_experts``. Features this
implementation does not have (sliding-window attention, RoPE scaling, attention bias) are rejected
with a ``ValueError`` naming the feature instead of being silently ignored.

Mixture of experts (``Qwen3MoeForCausalLM``): ``num_experts`` experts of width
``moe_intermediate_size``, ``num_experts_per_tok`` routed per token, the top-k weights renormalised
when ``norm_topk_prob``. Layer ``i`` is sparse iff ``num_experts > 0``, ``i`` is not in
``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0`` (transformers' rule); the other
layers keep the dense MLP of width ``intermediate_size``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from quasar_jax.cli.errors import InputError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"
_PACKAGED_PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


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
    # mixture of experts (num_experts == 0: a dense model; the other fields are then unused)
    num_experts: int = 0  # X: experts per sparse layer
    num_experts_per_tok: int = 0  # k: experts routed per token
    moe_intermediate_size: int = 0  # width of one expert's MLP
    norm_topk_prob: bool = False  # renormalise the top-k router weights to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for name in _REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
                value = getattr(self, name)
                if not _is_int(value) or value <= 0:
                    raise ValueError(f"config field {name} must be a positive integer for a mixture of "
                                     f"experts, got {value!r}")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                                 f"({self.num_experts})")
        elif not _is_int(self.num_experts) or self.num_experts < 0:
            raise ValueError(f"config field num_experts must be a non-negative integer, got {self.num_experts!r}")
        bad = [i for i in self.mlp_only_layers if not _is_int(i) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"config field mlp_only_layers holds {bad[0]!r}, not a layer index in "
                             f"[0, {self.num_hidden_layers})")

    @property
    def is_moe(self) -> bool:
        """Whether any layer is a sparse mixture-of-experts layer."""
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """transformers' rule: sparse iff experts exist, ``layer`` is not in ``mlp_only_layers``
        and ``(layer + 1) % decoder_sparse_step == 0``."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def q_per_kv(self) -> int:  # R
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        """Parameter count (embedding included, tied LM head counted once)."""
        d, f, e = self.hidden_size, self.intermediate_size, self.head_dim
        h, g = self.num_attention_heads, self.num_key_value_heads
        attn = d * h * e + 2 * d * g * e + h * e * d + 2 * e
        dense = 3 * d * f
        sparse = self.num_experts * (3 * d * self.moe_intermediate_size + d)  # experts + router
        n_sparse = len(self.moe_layers)
        layers = self.num_hidden_layers * (attn + 2 * d) + n_sparse * sparse + (
            self.num_hidden_layers - n_sparse) * dense
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + layers + d + head

    def num_active_params(self) -> int:
        """Parameters one token reads (its ``num_experts_per_tok`` experts, not all of them)."""
        if not self.num_experts:
            return self.num_params()
        d, k = self.hidden_size, self.num_experts_per_tok
        unread = (self.num_experts - k) * 3 * d * self.moe_intermediate_size
        return self.num_params() - len(self.moe_layers) * unread

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_hf_dict(cls, cfg: Any, source: str = "config") -> "Qwen3Config":
        """Build from the dict of a Hugging Face ``config.json``; reject unsupported features.

        Every field is checked against one schema (``_SCHEMA``); a problem raises ``InputError``
        naming ``source`` (the file) and the field.
        """
        if not isinstance(cfg, dict):
            raise InputError(f"{source}: config must be a JSON object, got {type(cfg).__name__}")
        v = {name: _read_field(cfg, name, kind, source) for name, kind in _SCHEMA.items()}
        model_type = v["model_type"] or "qwen3"
        if model_type not in ("qwen3", "qwen3_moe"):
            raise InputError(f"{source}: unsupported model_type {model_type!r}: only 'qwen3' and "
                             "'qwen3_moe' are implemented")
        moe = _read_moe(v, model_type, source)
        if v["attention_bias"]:
            raise InputError(f"{source}: unsupported config feature: attention_bias=True")
        if v["use_sliding_window"]:
            raise InputError(f"{source}: unsupported config feature: use_sliding_window=True "
                             "(sliding window attention)")
        layer_types = v["layer_types"] or []
        if any(t != "full_attention" for t in layer_types):
            raise InputError(f"{source}: unsupported config feature: layer_types {sorted(set(layer_types))} "
                             "(only full_attention)")
        act = v["hidden_act"] or "silu"
        if act != "silu":
            raise InputError(f"{source}: unsupported config feature: hidden_act={act!r} (only silu)")

        rope, scaling = v["rope_parameters"] or {}, v["rope_scaling"] or {}
        for name, part in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rope_type = part.get("rope_type", part.get("type", "default"))
            if rope_type not in ("default", None):
                raise InputError(f"{source}: unsupported config feature: rope scaling of type {rope_type!r} "
                                 f"({name})")
        theta = rope.get("rope_theta", v["rope_theta"])
        if theta is None:
            raise InputError(f"{source}: config has neither rope_theta nor rope_parameters.rope_theta")
        if not _is_number(theta) or theta <= 0:
            raise InputError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")

        for name in _REQUIRED:
            if v[name] is None:
                raise InputError(f"{source}: required field {name!r} is missing")
        heads, hidden = v["num_attention_heads"], v["hidden_size"]
        if v["head_dim"] is None and hidden % heads:
            raise InputError(f"{source}: no head_dim, and hidden_size ({hidden}) is not a multiple of "
                             f"num_attention_heads ({heads})")
        eos = v["eos_token_id"]
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        try:
            return cls(
                vocab_size=v["vocab_size"], hidden_size=hidden, num_hidden_layers=v["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=v["num_key_value_heads"] or heads,
                head_dim=v["head_dim"] or hidden // heads, intermediate_size=v["intermediate_size"],
                rms_norm_eps=float(1e-6 if v["rms_norm_eps"] is None else v["rms_norm_eps"]),
                rope_theta=float(theta),
                tie_word_embeddings=bool(v["tie_word_embeddings"]),
                max_position_embeddings=40960 if v["max_position_embeddings"] is None else v["max_position_embeddings"],
                bos_token_id=v["bos_token_id"], eos_token_id=eos, **moe)
        except ValueError as err:
            raise InputError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as err:
            raise InputError(f"cannot read config file {path}: {err.strerror or err}") from None
        except UnicodeDecodeError:
            raise InputError(f"config file {path} is not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise InputError(f"config file {path} is not valid JSON: {err}") from None
        except RecursionError:
            raise InputError(f"config file {path} is nested too deeply") from None
        return cls.from_hf_dict(data, source=str(path))

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
        """The fields of a transformers-5 style ``config.json`` for this model (a mixture of
        experts writes the hub's ``num_experts`` spelling, which transformers 4 and 5 both read)."""
        moe = {} if not self.num_experts else {
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size, "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": self.decoder_sparse_step, "mlp_only_layers": list(self.mlp_only_layers)}
        return {
            "architectures": ["Qwen3MoeForCausalLM" if self.num_experts else "Qwen3ForCausalLM"],
            "model_type": "qwen3_moe" if self.num_experts else "qwen3",
            **moe,
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


# ----------------------------------------------------------------------------- the schema
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# field -> kind; every field is optional at this level (None when absent or null), _REQUIRED are
# then checked for presence.
_SCHEMA = {
    "model_type": "str", "hidden_act": "str",
    "vocab_size": "positive int", "hidden_size": "positive int", "num_hidden_layers": "positive int",
    "num_attention_heads": "positive int", "num_key_value_heads": "positive int",
    "head_dim": "positive int", "intermediate_size": "positive int",
    "max_position_embeddings": "positive int",
    "rms_norm_eps": "positive number", "rope_theta": "any",
    "tie_word_embeddings": "bool", "attention_bias": "bool", "use_sliding_window": "bool",
    "bos_token_id": "token id", "eos_token_id": "token ids",
    "layer_types": "list of str", "rope_parameters": "object", "rope_scaling": "object",
    "num_experts": "non-negative int", "num_local_experts": "non-negative int",
    "num_experts_per_tok": "positive int", "moe_intermediate_size": "positive int",
    "norm_topk_prob": "bool", "decoder_sparse_step": "positive int", "mlp_only_layers": "list of int",
}


def _read_moe(v: dict, model_type: str, source: str) -> dict:
    """The mixture-of-experts fields of a checked config (``{}`` for a dense model)."""
    hub, tf5 = v["num_experts"], v["num_local_experts"]
    if hub is not None and tf5 is not None and hub != tf5:
        raise InputError(f"{source}: num_experts ({hub}) and num_local_experts ({tf5}) disagree")
    experts = hub if hub is not None else tf5
    if model_type == "qwen3":
        if experts:
            raise InputError(f"{source}: model_type 'qwen3' is dense but the config has experts "
                             f"(num_experts={experts}); a mixture of experts is model_type 'qwen3_moe'")
        return {}
    for name in ("num_experts_per_tok", "moe_intermediate_size"):
        if experts and v[name] is None:
            raise InputError(f"{source}: required field {name!r} is missing (model_type 'qwen3_moe')")
    if not experts:  # a qwen3_moe config without experts is a dense model
        return {}
    return dict(num_experts=experts, num_experts_per_tok=v["num_experts_per_tok"],
                moe_intermediate_size=v["moe_intermediate_size"],
                norm_topk_prob=bool(v["norm_topk_prob"]),
                decoder_sparse_step=1 if v["decoder_sparse_step"] is None else v["decoder_sparse_step"],
                mlp_only_layers=tuple(v["mlp_only_layers"] or ()))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _kind_ok(value, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "positive int":
        return _is_int(value) and value > 0
    if kind == "non-negative int":
        return _is_int(value) and value >= 0
    if kind == "list of int":
        return isinstance(value, list) and all(_is_int(t) for t in value)
    if kind == "positive number":
        return _is_number(value) and value > 0
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "token id":
        return _is_int(value) and 0 <= value < 2**31
    if kind == "token ids":
        return _kind_ok(value, "token id") or (
            isinstance(value, list) and all(_kind_ok(t, "token id") for t in value))
    if kind == "list of str":
        return isinstance(value, list) and all(isinstance(t, str) for t in value)
    if kind == "object":
        return isinstance(value, dict)
    raise AssertionError(kind)


def _read_field(cfg: dict, name: str, kind: str, source: str):
    value = cfg.get(name)
    if value is None or _kind_ok(value, kind):
        return value
    article = "an" if kind[0] in "aeiou" else "a"
    what = {"token ids": "a token id or a list of token ids", "object": "a JSON object",
            "list of str": "a list of strings", "str": "a string", "bool": "true or false",
            "list of int": "a list of integers"}.get(
                kind, f"{article} {kind.replace('int', 'integer')}")
    raise InputError(f"{source}: field {name!r} must be {what}, got {json.dumps(value)[:60]}")


def preset_names() -> list[str]:
    names = {p.stem for d in (PRESET_DIR, _PACKAGED_PRESET_DIR) if d.is_dir() for p in d.glob("*.json")}
    return sorted(names)
