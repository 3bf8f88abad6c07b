"""The small closed vocabularies of the project, as types.

* :class:`QuantMode` is how one forward pass multiplies by its projection weights. It is the one
  name for the concept from the command line (``--verifier``) through ``GenerationConfig.verifier``
  down to the int8 layer (``model(..., mode=QuantMode.W8A16)``):

  - ``FLOAT``: float weights, float activations (a model that holds float ``Linear`` layers);
  - ``W8A16``: int8 weights, activations stay float (weight-only; the Quasar / QSpec verifier);
  - ``W8A8``: int8 weights and dynamic per-token int8 activations, int8 x int8 -> int32 dots
    (QSpec's drafter, or a cheaper verifier).

  The two int8 modes share one set of int8 weights; which one runs is chosen per call.
* :class:`Backend` is which implementation runs the int8 matmul.

Both are ``str`` enums: ``QuantMode("w8a16") is QuantMode.W8A16``, they compare equal to their
values, print as their values, and ``.parse`` gives a one-line ``ValueError`` naming the choices.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """A ``str`` enum with a validating ``parse`` (accepts a member or its value)."""

    @classmethod
    def parse(cls, value, what: str | None = None):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown {what or cls.__name__} {value!r}; choose one of {choices}") from None

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class QuantMode(Choice):
    """How a forward pass multiplies by its projection weights (see the module docstring)."""

    FLOAT = "float"
    W8A16 = "w8a16"
    W8A8 = "w8a8"

    @property
    def is_int8(self) -> bool:
        return self is not QuantMode.FLOAT


class Backend(Choice):
    """Implementation of the int8 matmul: XLA's dot (``xla``) or the Pallas kernels (``pallas``)."""

    XLA = "xla"
    PALLAS = "pallas"
