"""The benchmark's modes: what each one runs (model, drafter, verifier) and which autoregressive
mode it must reproduce under greedy decoding. See the package docstring for the table."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from quasar_jax.model.modes import QuantMode

MODES = ("ar-fp", "ar-int8", "ar-w8a8", "sd-fp", "quasar-w8a16", "quasar-w8a8", "qspec", "tree-fp",
         "tree-w8a16", "s4c-fp", "s4c-w8a16", "hf-ar", "hf-pld")
DEFAULT_MODES = ("ar-fp", "ar-int8", "sd-fp", "quasar-w8a16", "quasar-w8a8", "qspec", "hf-ar",
                 "hf-pld")
BASELINE = "ar-fp"


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    name: str
    kind: str  # "jax" | "hf"
    model: str  # "float" | "int8" | "hf": which loaded model runs it
    drafter: str  # none | ngram | qspec | s4c (hf: none | pld)
    verifier: QuantMode  # the verify (and AR) forward's matmuls; HF peers run float
    reference: str  # the AR mode whose outputs this mode must reproduce (greedy)
    tree: bool = False  # n-gram candidates verified as one token tree (--num-candidates C)


_F, _W16, _W8 = QuantMode.FLOAT, QuantMode.W8A16, QuantMode.W8A8
SPECS = {s.name: s for s in (
    ModeSpec("ar-fp", "jax", "float", "none", _F, "ar-fp"),
    ModeSpec("ar-int8", "jax", "int8", "none", _W16, "ar-int8"),
    ModeSpec("ar-w8a8", "jax", "int8", "none", _W8, "ar-w8a8"),
    ModeSpec("sd-fp", "jax", "float", "ngram", _F, "ar-fp"),
    ModeSpec("quasar-w8a16", "jax", "int8", "ngram", _W16, "ar-int8"),
    ModeSpec("quasar-w8a8", "jax", "int8", "ngram", _W8, "ar-w8a8"),
    ModeSpec("qspec", "jax", "int8", "qspec", _W16, "ar-int8"),
    ModeSpec("tree-fp", "jax", "float", "ngram", _F, "ar-fp", tree=True),
    ModeSpec("tree-w8a16", "jax", "int8", "ngram", _W16, "ar-int8", tree=True),
    ModeSpec("s4c-fp", "jax", "float", "s4c", _F, "ar-fp"),
    ModeSpec("s4c-w8a16", "jax", "int8", "s4c", _W16, "ar-int8"),
    ModeSpec("hf-ar", "hf", "hf", "none", _F, "ar-fp"),
    ModeSpec("hf-pld", "hf", "hf", "pld", _F, "ar-fp"),
)}
# int8 activation mode -> the autoregressive run that shows its greedy trajectory
AR_OF_QUANT_MODE = {_W16: "ar-int8", _W8: "ar-w8a8"}


def resolve_modes(requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """Requested modes -> (modes to run in canonical order, the ones added as references)."""
    unknown = [m for m in requested if m not in SPECS]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if not requested:
        raise ValueError("no modes given")
    need = set(requested) | {BASELINE}
    need |= {SPECS[m].reference for m in list(need)}
    added = [m for m in MODES if m in need and m not in requested]
    return [m for m in MODES if m in need], added
