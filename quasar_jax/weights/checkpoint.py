"""Converted checkpoints: float or int8 params saved with orbax-checkpoint, ready to serve.

A converted directory holds::

    quasar_jax.json        format marker: {"format": 1, "quantize": "none"|"int8", "lm_head_int8", "dtype"}
    config.json            the model's Hugging Face style config
    params/                orbax-checkpoint of the model's parameter pytree (int8 values + scales
                           for quantised projections, float arrays otherwise)
    tokenizer files, generation_config.json (copied from the source)

Loading it skips safetensors conversion and quantisation: the abstract (quantised) model is built
with ``nnx.eval_shape`` and orbax restores straight into its layout. orbax is imported only when a
checkpoint is saved or restored (it adds ~0.5 s to an import).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from quasar_jax import sharding
from quasar_jax.cli.errors import InputError
from quasar_jax.cli.outputs import check_output_dir, staged_dir
from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.modes import Backend, QuantMode
from quasar_jax.model.moe import set_expert_mesh
from quasar_jax.model.quant import Int8ExpertLinear, Int8Linear, abstract_quantized_model, is_quantized
from quasar_jax.model.qwen3 import Qwen3, abstract_model

MARKER = "quasar_jax.json"
FORMAT = 1
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
               "merges.txt", "chat_template.jinja", "generation_config.json", "added_tokens.json")


def is_converted_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_converted(model: Qwen3, out_dir: str | Path, *, source_dir: str | Path | None = None) -> Path:
    """Save ``model`` (float or quantised) with orbax; copy tokenizer files from ``source_dir``.

    ``out_dir`` must be new or empty (``quasar_jax.cli.outputs.check_output_dir``). Everything is
    written into a hidden sibling first and renamed into place when complete, so a failed or
    interrupted save leaves nothing behind.
    """
    import orbax.checkpoint as ocp

    out = check_output_dir(out_dir, flag="output directory", source=source_dir)
    quantized = is_quantized(model)
    lm_head_int8 = isinstance(model.lm_head, Int8Linear)
    meta = {"format": FORMAT, "quantize": "int8" if quantized else "none",
            "lm_head_int8": bool(lm_head_int8), "dtype": jnp.dtype(model.dtype).name}
    with staged_dir(out) as stage:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(stage / "params", nnx.to_pure_dict(nnx.state(model)))
            ckpt.wait_until_finished()
        (stage / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        if source_dir is not None:
            for name in _SIDE_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy(Path(source_dir) / name, stage / name)
        (stage / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def converted_meta(path: str | Path) -> dict | None:
    """The marker of a converted directory (None when ``path`` is not one)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{marker} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{marker}: expected a JSON object")
    return meta


def default_verifier(model_dir: str | Path, drafter: str, platform: str) -> QuantMode:
    """What ``--verifier auto`` means: int8 weight-only (W8A16) where it pays off or is required
    (a GPU or TPU, whose verify step is memory-bound; a converted int8 checkpoint; QSpec, which
    verifies with W8A16), else float (a CPU, where XLA's W8A16 dot materialises a float weight)."""
    meta = converted_meta(model_dir)
    if drafter == "qspec" or platform in ("gpu", "tpu") or (meta is not None and meta.get("quantize") == "int8"):
        return QuantMode.W8A16
    return QuantMode.FLOAT


def load_converted(path: str | Path, *, dtype=None, backend: Backend | str = Backend.XLA,
                   mesh=None) -> Qwen3:
    """Restore a converted directory; ``dtype`` casts the float params (default: as saved);
    ``backend`` is the int8 layers' matmul implementation (if the checkpoint is int8).

    ``mesh`` (a ``jax.sharding.Mesh`` or a spec such as ``"data=2,model=4"``) restores every
    array straight onto its shards (``quasar_jax.sharding`` rules): orbax reads each device's
    slice, so no device or host holds a whole model copy.
    """
    import orbax.checkpoint as ocp

    backend = Backend.parse(backend, "backend")
    path = Path(path).resolve()
    try:
        meta = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"not a converted quasar_jax checkpoint (no {MARKER}): {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / MARKER} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / MARKER}: unsupported format (expected {{\"format\": {FORMAT}, ...}})")
    missing = [k for k in ("quantize", "dtype", "lm_head_int8") if k not in meta]
    if missing:
        raise ValueError(f"{path / MARKER} lacks field {missing[0]!r}")
    for needed in ("config.json", "params"):
        if not (path / needed).exists():
            raise FileNotFoundError(f"converted checkpoint {path} is missing {needed}")
    cfg = Qwen3Config.from_json(path / "config.json")
    saved_dtype = jnp.dtype(meta["dtype"])
    if meta["quantize"] == "int8":
        abstract = abstract_quantized_model(cfg, saved_dtype, lm_head=meta["lm_head_int8"],
                                            backend=backend)
    elif meta["quantize"] == "none":
        abstract = abstract_model(cfg, saved_dtype)
    else:
        raise ValueError(f"{path / MARKER}: unknown quantize value {meta['quantize']!r}")
    graphdef, state = nnx.split(abstract)
    mesh = sharding.make_mesh(mesh)
    if mesh is not None:  # abstract targets that carry their shardings: orbax restores onto them
        state = sharding.sharded_abstract(state, sharding.param_shardings(state, mesh, cfg))
    target = nnx.to_pure_dict(state)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(path / "params", target)
    except Exception as err:  # orbax reports missing / mismatched arrays in many shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not restore params from {path / 'params'}: {first}") from None
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    set_expert_mesh(model, mesh)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        model = cast_float_params(model, dtype)
    return model


def cast_float_params(model: Qwen3, dtype) -> Qwen3:
    """Cast, in place, the float params (embedding, norms, float projections) to ``dtype``.

    Walks the module tree: every floating ``nnx.Param`` of every module but an ``Int8Linear``
    (whose int8 values and float32 scales are left alone). Returns ``model``.
    """
    dtype = jnp.dtype(dtype)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (Int8Linear, Int8ExpertLinear)):
            continue
        for param in vars(module).values():
            if isinstance(param, nnx.Param) and jnp.issubdtype(param.get_value().dtype, jnp.floating):
                param.set_value(param.get_value().astype(dtype))
    model.dtype = dtype
    return model
