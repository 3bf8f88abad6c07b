"""Pallas kernels for quasar_jax (matmul letters M, I, O: see
docs/CONVENTIONS.md).

* :func:`int8_matmul` - int8-weight matmul (W8A16 / W8A8) dispatching to a
  Pallas Mosaic (TPU) or Pallas Triton (GPU) kernel, or the XLA reference.
* :func:`int8_matmul_reference` - pure-JAX reference.
* :func:`quantize_rows` - dynamic per-row symmetric int8 quantisation.
"""

from pallas_kernels.int8_matmul import BlockSizes
from pallas_kernels.int8_matmul import int8_matmul
from pallas_kernels.int8_matmul import int8_matmul_reference
from pallas_kernels.int8_matmul import quantize_rows

__all__ = ["BlockSizes", "int8_matmul", "int8_matmul_reference",
           "quantize_rows"]
