"""int8 weight-quantised matmul: Pallas TPU/GPU kernels, wrapper, reference."""

from pallas_kernels.int8_matmul.reference import int8_matmul_reference
from pallas_kernels.int8_matmul.reference import quantize_rows
from pallas_kernels.int8_matmul.tuned_block_sizes import BlockSizes
from pallas_kernels.int8_matmul.tuned_block_sizes import get_block_sizes
from pallas_kernels.int8_matmul.wrapper import int8_matmul

__all__ = ["BlockSizes", "get_block_sizes", "int8_matmul",
           "int8_matmul_reference", "quantize_rows"]
