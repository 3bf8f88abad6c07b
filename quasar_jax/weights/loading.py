"""Hugging Face checkpoints <-> quasar_jax models.

``load_model`` reads a local directory (``config.json`` plus ``model.safetensors`` or sharded
``model-*.safetensors`` with ``model.safetensors.index.json``), a hub id (downloaded with
``huggingface_hub``), or ``"demo"`` (the model shipped in ``quasar_jax/assets``). Tensors are read
one at a time and written straight into an abstractly built model, so the host never holds a
second full copy of the weights; with ``int8=True`` each projection is quantised as it arrives
(``load_params_into``'s ``tensor_hook``).

The key table is derived from the module tree (the attribute names mirror the HF keys: a
``Linear`` at ``self_attn.q_proj`` is ``...self_attn.q_proj.weight``, an ``RMSNorm`` its
``.weight``), not from a list of names. It is strict: every expected tensor must be present with the expected shape, and an
unknown tensor is an error; each error names the tensor. A tied checkpoint may omit
``lm_head.weight`` (if present it must equal the embedding's shape and is ignored).

Mixture of experts (``Qwen3MoeForCausalLM``): the experts of a sparse layer are stacked
``ExpertLinear`` kernels ``[X, I, O]``. Both checkpoint layouts load: per expert
(``mlp.experts.{e}.gate_proj.weight`` etc., what the hub holds and transformers 5's
``save_pretrained`` writes) and fused (``mlp.experts.gate_up_proj [X, 2F, D]`` and
``mlp.experts.down_proj [X, D, F]``, transformers 5's in-memory layout). Per-expert tensors are
gathered one projection of one layer at a time (:func:`merge_experts`); the router
``mlp.gate.weight [X, D]`` is kept as is and never quantised.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from quasar_jax.weights import checkpoint

from quasar_jax import sharding
from quasar_jax.cli.errors import InputError
from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.modes import Backend
from quasar_jax.model.moe import ExpertLinear, set_expert_mesh
from quasar_jax.model.quant import Int8ExpertLinear, Int8Linear, is_quantized, quantize_model
from quasar_jax.model.qwen3 import DecoderLayer, Linear, Qwen3, RMSNorm, abstract_model, get_path, set_path

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo-qwen3"
DEMO_MOE_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo-qwen3-moe"  # "demo-moe"


def _tensor_paths(module: nnx.Module) -> dict[str, tuple]:
    """HF name (relative to ``module``) -> attribute path of each Linear kernel / RMSNorm scale."""
    table = {}
    for path, m in nnx.iter_modules(module):
        name = ".".join(map(str, path))
        if isinstance(m, ExpertLinear):  # stacked experts: a name of merge_experts, no ".weight"
            table[name] = path + ("kernel",)
            continue
        leaf = "kernel" if isinstance(m, Linear) else "scale" if isinstance(m, RMSNorm) else (
            "weight" if isinstance(getattr(m, "weight", None), nnx.Param) else None)  # the MoE router
        if leaf is not None:
            table[name + ".weight"] = path + (leaf,)
    return table


def key_table(cfg: Qwen3Config) -> dict[str, tuple]:
    """HF tensor name -> attribute path in ``Qwen3`` (a tuple of names and layer indices).

    A sparse layer's experts appear stacked, as ``model.layers.{i}.mlp.experts.gate_proj`` etc.
    (the names :func:`merge_experts` gives the per-expert or fused tensors)."""
    templates = {}
    table = {"model.embed_tokens.weight": ("embed_tokens",), "model.norm.weight": ("norm", "scale")}
    for i in range(cfg.num_hidden_layers):
        sparse = cfg.is_moe_layer(i)
        if sparse not in templates:
            layer = nnx.eval_shape(lambda: DecoderLayer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), layer=i))
            templates[sparse] = _tensor_paths(layer)
        for name, path in templates[sparse].items():
            table[f"model.layers.{i}.{name}"] = ("layers", i) + path
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = ("lm_head", "kernel")
    return table


def is_linear_path(path: tuple) -> bool:
    return path[-1] == "kernel"


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def merge_experts(tensors, cfg: Qwen3Config):
    """Stack per-expert tensors (``...mlp.experts.{e}.gate_proj.weight [O, I]``) into
    ``...mlp.experts.gate_proj [X, O, I]``, split fused ``gate_up_proj [X, 2F, D]`` into gate and
    up; every other tensor passes through. One projection of one layer is buffered at a time
    (checkpoints list a layer's experts together); an incomplete set is an error naming the
    first missing expert."""
    pending: dict[str, dict[int, np.ndarray]] = {}
    for name, array in tensors:
        match = _EXPERT.match(name)
        if match and cfg.num_experts:
            prefix, e, proj = match.group(1), int(match.group(2)), match.group(3)
            if e >= cfg.num_experts:
                raise ValueError(f"unknown tensor in checkpoint: {name} (expert {e} of {cfg.num_experts})")
            key = f"{prefix}.{proj}"
            group = pending.setdefault(key, {})
            if e in group:
                raise ValueError(f"tensor {name} appears twice in the checkpoint")
            group[e] = np.asarray(array)
            if len(group) == cfg.num_experts:
                shapes = {a.shape for a in group.values()}
                if len(shapes) != 1:
                    raise ValueError(f"the experts of {key} have different shapes: {sorted(shapes)}")
                yield key, np.stack([group[i] for i in range(cfg.num_experts)])
                del pending[key]
            continue
        match = _FUSED.match(name)
        if match and cfg.num_experts:
            array = np.asarray(array)
            if match.group(2) == "gate_up_proj":
                f = cfg.moe_intermediate_size
                if array.ndim != 3 or array.shape[1] != 2 * f:
                    raise ValueError(f"tensor {name} has shape {tuple(array.shape)}, expected "
                                     f"{(cfg.num_experts, 2 * f, cfg.hidden_size)}")
                yield f"{match.group(1)}.gate_proj", array[:, :f]
                yield f"{match.group(1)}.up_proj", array[:, f:]
            else:
                yield name, array
            continue
        yield name, array
    for key, group in pending.items():
        first = min(set(range(cfg.num_experts)) - set(group))
        prefix, proj = key.rsplit(".", 1)
        raise ValueError(f"checkpoint is missing tensor {prefix}.{first}.{proj}.weight")


# ------------------------------------------------------------------------ resolving a model name
def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """``"demo"``, ``"demo-moe"``, a local directory, or a hub id -> local directory with ``config.json``."""
    name = str(name_or_path)
    demos = {"demo": DEMO_MODEL_DIR, "demo-moe": DEMO_MOE_MODEL_DIR}
    if name in demos:
        if not (demos[name] / "config.json").is_file():
            raise FileNotFoundError(f"the {name} model is not installed at {demos[name]}")
        return demos[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model directory not found: {name}")
    try:
        from huggingface_hub import snapshot_download  # ~0.15 s to import: only for hub ids

        local = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as err:  # network, auth, unknown repo: one line naming the id
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"model {name!r} is neither a local directory nor downloadable from the hub ({reason})") from None
    return Path(local)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shard listed in {index.name} is missing: {missing[0]}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, host array)`` one tensor at a time across all shards."""
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="numpy") as f:
                names = list(f.keys())
                for name in names:
                    yield name, f.get_tensor(name)
        except Exception as err:  # safetensors' own error types: report which file is broken
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot read safetensors file {file}: {first}") from None


# ------------------------------------------------------------------------ loading
TensorHook = Callable[[str, tuple, jax.Array], object]
Place = Callable[[tuple, np.ndarray, object], jax.Array]  # (path, host array, dtype) -> device array


def _to_device(path: tuple, host: np.ndarray, dtype) -> jax.Array:
    """One device (the default): the whole tensor, cast there."""
    del path
    return jnp.asarray(host).astype(dtype)


def load_params_into(model: Qwen3, tensors, *, dtype, tensor_hook: TensorHook | None = None,
                     place: Place | None = None) -> Qwen3:
    """Fill ``model`` (built abstractly or not) from ``(hf_name, array)`` pairs, strictly.

    ``tensor_hook(hf_name, path, kernel)`` may return a replacement module for a Linear
    (``path`` ends in ``"kernel"``, ``kernel`` is ``[I, O]`` float32) or ``None`` to keep it.
    ``place(path, host, dtype)`` puts a host tensor (already in the model's layout) on the
    device(s): the default device, or its shards (``quasar_jax.sharding.Placer``).
    """
    place = place or _to_device
    cfg = model.config
    table = key_table(cfg)
    seen: set[str] = set()
    for name, array in merge_experts(tensors, cfg):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            if tuple(array.shape) != (cfg.vocab_size, cfg.hidden_size):
                raise ValueError(f"tensor lm_head.weight has shape {tuple(array.shape)}, "
                                 f"expected {(cfg.vocab_size, cfg.hidden_size)}")
            continue  # tied: the head is the embedding
        if name not in table:
            raise ValueError(f"unknown tensor in checkpoint: {name}")
        if name in seen:
            raise ValueError(f"tensor {name} appears twice in the checkpoint")
        path = table[name]
        variable = get_path(model, path)
        array = np.asarray(array)
        if is_linear_path(path):
            array = np.swapaxes(array, -1, -2)  # torch weight [(X,) O, I] -> kernel [(X,) I, O]
        expected = tuple(variable.shape)
        if tuple(array.shape) != expected:
            def torch(shape):
                return tuple(shape[:-2]) + tuple(shape[-2:])[::-1] if is_linear_path(path) else tuple(shape)
            raise ValueError(f"tensor {name} has shape {torch(array.shape)}, expected {torch(expected)}")
        # A hook (int8 quantisation) sees the checkpoint's values in float32, not rounded to the
        # load dtype first, so the int8 weights do not depend on --dtype.
        hooked = tensor_hook and is_linear_path(path)
        replacement = tensor_hook(name, path, place(path, array, jnp.float32)) if hooked else None
        if replacement is not None:
            set_path(model, path[:-1], replacement)
        else:
            variable.set_value(place(path, array, dtype))
        seen.add(name)
    missing = [k for k in table if k not in seen]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model


def load_model(name_or_path: str | os.PathLike = "demo", *, dtype=jnp.float32, int8: bool = False,
               quantize_lm_head: bool = False, backend: Backend | str = Backend.XLA,
               mesh=None) -> Qwen3:
    """Load a Qwen3 model from ``"demo"``, a local HF or converted directory, or a hub id.

    ``int8=True`` quantises every attention/MLP projection (and the untied LM head with
    ``quantize_lm_head``) as it is read, so no float copy of those weights is ever kept;
    ``backend`` is the int8 layers' matmul implementation. The activation mode is not stored:
    call the model with ``mode=QuantMode.W8A16`` or ``W8A8``. A converted directory loads as saved
    (float or int8); ``int8=True`` quantises a float one after loading.

    ``mesh`` (a ``jax.sharding.Mesh`` or a spec such as ``"data=2,model=4"``; ``None``: one
    device) places every tensor directly on its shards as it is read (``quasar_jax.sharding``'s
    rules; int8 quantisation runs sharded too): no device ever holds a whole weight, and the host
    holds about one tensor at a time.
    """
    backend = Backend.parse(backend, "backend")
    mesh = sharding.make_mesh(mesh)
    model_dir = resolve_model_dir(name_or_path)
    if checkpoint.is_converted_dir(model_dir):
        model = checkpoint.load_converted(model_dir, dtype=dtype, backend=backend, mesh=mesh)
        if quantize_lm_head and model.config.tie_word_embeddings:
            raise InputError("quantize_lm_head: this model ties its LM head to the float embedding; "
                             "there is no separate lm_head to quantise")
        if quantize_lm_head and not isinstance(model.lm_head, Int8Linear) and is_quantized(model):
            raise InputError(f"quantize_lm_head: {model_dir} is a converted int8 checkpoint with a float "
                             "LM head; convert its source with --quantize-lm-head instead")
        if int8 and not is_quantized(model):
            model = quantize_model(model, lm_head=quantize_lm_head, backend=backend)
            if mesh is not None:
                sharding.place_model(model, mesh)
        return model
    cfg = Qwen3Config.from_json(model_dir / "config.json")
    placer = sharding.Placer(mesh, cfg) if mesh is not None else None  # checks the mesh fits cfg
    tensor_hook = None  # float load: every tensor as it is
    if int8:
        if quantize_lm_head and cfg.tie_word_embeddings:
            raise ValueError("quantize_lm_head: this model ties its LM head to the float embedding; "
                             "there is no separate lm_head to quantise")

        def tensor_hook(name, path, kernel):
            if path[0] == "lm_head" and not quantize_lm_head:
                return None
            layer_cls = Int8ExpertLinear if kernel.ndim == 3 else Int8Linear
            if placer is not None:  # quantised on the shards, each output on its own sharding
                qvalue, scale = placer.quantize(path, kernel)
                return layer_cls(qvalue, scale, backend=backend)
            return layer_cls.from_kernel(kernel, backend=backend, name=name)

    model = abstract_model(cfg, dtype)
    model = load_params_into(model, iter_safetensors(model_dir), dtype=dtype, tensor_hook=tensor_hook,
                             place=placer)
    set_expert_mesh(model, mesh)
    return model


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name_or_path: str | os.PathLike = "demo"):
    """The directory's tokenizer (its ``config.json`` is validated first, so a broken config is
    reported by field and file rather than by the tokenizer library)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    Qwen3Config.from_json(model_dir / "config.json")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)} not found)")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InputError(f"{path} is not valid JSON: {err}") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:
        first = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"could not load a tokenizer from {model_dir}: {first[:300]}") from None


def load(name_or_path: str | os.PathLike = "demo", *, dtype=jnp.float32, int8: bool = False,
         quantize_lm_head: bool = False, backend: Backend | str = Backend.XLA, mesh=None):
    """``(model, tokenizer)`` for ``"demo"``, a local HF or converted directory, or a hub id
    (the model as :func:`load_model` gives it)."""
    model = load_model(name_or_path, dtype=dtype, int8=int8, quantize_lm_head=quantize_lm_head,
                       backend=backend, mesh=mesh)
    return model, load_tokenizer(name_or_path)


# ------------------------------------------------------------------------ saving
def hf_state_dict(model: Qwen3) -> dict[str, np.ndarray]:
    """The model's float parameters under HF names (torch layout), as numpy arrays."""
    out = {}
    for name, path in key_table(model.config).items():
        try:
            value = get_path(model, path)[...]
        except AttributeError:
            raise ValueError(f"cannot export {name} to Hugging Face format: it is quantised to int8 "
                             "(save int8 models with quasar_jax.convert / checkpoint.save_converted)") from None
        value = np.asarray(jax.device_get(value))
        if is_linear_path(path):
            value = np.swapaxes(value, -1, -2)
        if value.ndim == 3:  # stacked experts -> the per-expert tensors transformers writes
            prefix, proj = name.rsplit(".", 1)
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = np.ascontiguousarray(value[e])
        else:
            out[name] = np.ascontiguousarray(value)
    return out


def save_pretrained(model: Qwen3, out_dir: str | os.PathLike, *, dtype=None, tokenizer=None,
                    generation_config: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) that transformers loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:
        # numpy has no bfloat16; safetensors.numpy accepts ml_dtypes arrays
        np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
        tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(jnp.dtype(dtype or model.dtype))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
