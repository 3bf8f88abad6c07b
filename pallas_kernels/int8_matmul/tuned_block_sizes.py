"""Block sizes for the int8 matmul kernels: a tuned table plus heuristics.

Matmul letters: M rows, I input features, O output features.

The table is keyed by ``(device, m_bucket, I, O, act_quant)``:

* ``device``: a short device family from :func:`device_family`
  (``"H100"``, ``"H200"``, ``"A100"``, ``"TPU v5e"``, ...; ``"cpu"``).
* ``m_bucket``: :func:`m_bucket` of M (next power of two, at least 16,
  at most 1024).
* ``I``, ``O``: the unpadded weight shape.
* ``act_quant``: W8A8 (True) or W8A16 (False).

Entries were measured with ``scripts/bench_kernels.py --sweep`` (bf16
activations).  Anything not in the table falls back to a per-backend
heuristic (:func:`default_block_sizes`), which is "sane" (memory-bound
friendly for small M, standard tiles for large M) but not tuned.
The wrapper adapts whatever comes out of here to the actual shape (it
shrinks blocks to divisors of I/O where it can, so weights need no padding).
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Kernel tiling.

    block_m / block_o / block_i: tile sizes along M, O and I.
    split_k: GPU only; the I reduction is split over this many programs (the
      partial sums are added by XLA), to get enough programs in flight when
      M is small and O is narrow.
    num_warps / num_stages: GPU (Triton) only.
    """
    block_m: int
    block_o: int
    block_i: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# Number of streaming multiprocessors, used by the split-K heuristic.
_GPU_SM_COUNT = {"H100": 132, "H200": 132, "A100": 108, "L4": 58}


def device_family(device_kind: str | None = None) -> str:
    """Normalises ``jax.devices()[0].device_kind`` to a short family name."""
    if device_kind is None:
        try:
            device_kind = jax.devices()[0].device_kind
        except Exception:  # pragma: no cover - no devices at all
            return "unknown"
    kind = device_kind.lower()
    for fam in ("H200", "H100", "A100", "L4", "B200"):
        if fam.lower() in kind:
            return fam
    if "tpu" in kind:
        if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
            return "TPU v5e"
        if "v6 lite" in kind or "v6e" in kind:
            return "TPU v6e"
        for v in ("v7", "v6", "v5p", "v5", "v4", "v3", "v2"):
            if v in kind:
                return f"TPU {v}"
        return "TPU"
    if "cpu" in kind:
        return "cpu"
    return device_kind


def m_bucket(m: int) -> int:
    """Next power of two >= m, clamped to [16, 1024]."""
    b = 16
    while b < m and b < 1024:
        b *= 2
    return b


# (device, m_bucket, I, O, act_quant) -> BlockSizes.
# Qwen3-0.6B: D=1024, F=3072, H*E=2048, G*E=1024.  Qwen3-8B: D=4096,
# F=12288, H*E=4096, G*E=1024.
TUNED_BLOCK_SIZES: dict[tuple[str, int, int, int, bool], BlockSizes] = {
    # (num_warps=4 everywhere.)  H100 80GB HBM3, jax 0.11.2, bf16 x: best of a short
    # `bench_kernels.py --sweep` (one run, 5 timed calls per candidate; the
    # spread between the top candidates was within the run's noise, so
    # these are "good", not provably optimal).  Re-sweep on new hardware.
    ("H100", 16, 1024, 3072, False): BlockSizes(16, 64, 256, split_k=2, num_stages=4),
    ("H100", 16, 1024, 3072, True): BlockSizes(16, 128, 256, split_k=4, num_stages=4),
    ("H100", 16, 4096, 12288, False): BlockSizes(16, 64, 256, split_k=1, num_stages=4),
    ("H100", 16, 4096, 12288, True): BlockSizes(16, 64, 512, split_k=2, num_stages=4),
    ("H100", 16, 12288, 4096, False): BlockSizes(16, 64, 512, split_k=4, num_stages=3),
    ("H100", 16, 12288, 4096, True): BlockSizes(16, 64, 512, split_k=2, num_stages=4),
    ("H100", 64, 1024, 3072, False): BlockSizes(64, 64, 128, split_k=2, num_stages=4),
    ("H100", 64, 1024, 3072, True): BlockSizes(64, 64, 256, split_k=4, num_stages=4),
    ("H100", 64, 4096, 12288, False): BlockSizes(64, 64, 128, split_k=1, num_stages=4),
    ("H100", 64, 4096, 12288, True): BlockSizes(64, 64, 128, split_k=2, num_stages=4),
    ("H100", 64, 12288, 4096, False): BlockSizes(64, 128, 128, split_k=4, num_stages=4),
    ("H100", 64, 12288, 4096, True): BlockSizes(64, 64, 256, split_k=8, num_stages=4),
}


def _pow2_floor(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def default_block_sizes(m: int, i: int, o: int, act_quant: bool, *,
                        backend: str, device: str = "unknown",
                        x_itemsize: int = 2) -> BlockSizes:
    """Heuristic block sizes when the table has no entry."""
    if backend == "tpu":
        align = 32 if act_quant else (16 if x_itemsize == 2 else 8)
        bm = min(256, -(-m // align) * align)
        if m <= 256:
            return BlockSizes(bm, 1024, 1024)
        return BlockSizes(256, 512, 1024)
    # GPU (Triton).
    if m <= 64:
        # Memory bound on the int8 weight bytes: one M block (weights read
        # once), narrow O tiles and split-K for enough programs in flight.
        bm = max(16, 1 << (m - 1).bit_length())
        x_bytes = 1 if act_quant else x_itemsize
        bi = 512
        while bi > 64 and bm * bi * x_bytes > 16 * 1024:
            bi //= 2
        bo = 64
        n_prog = max(1, o // bo)
        sms = _GPU_SM_COUNT.get(device, 132)
        split = 1
        while (n_prog * split < 2 * sms and i % (2 * split * bi) == 0
               and i // (2 * split) >= 2 * bi and split < 8):
            split *= 2
        return BlockSizes(bm, bo, bi, split_k=split, num_stages=4)
    if m <= 128:
        return BlockSizes(64, 128, 64, num_stages=4)
    return BlockSizes(128, 128, 64, num_warps=8, num_stages=3)


def get_block_sizes(m: int, i: int, o: int, act_quant: bool, *,
                    backend: str, device_kind: str | None = None,
                    x_itemsize: int = 2) -> BlockSizes:
    """Looks up the tuned table, falling back to :func:`default_block_sizes`.

    ``backend`` is "gpu" or "tpu"; ``device_kind`` defaults to the first
    device's kind.
    """
    device = device_family(device_kind)
    bucket = m_bucket(m)
    hit = TUNED_BLOCK_SIZES.get((device, bucket, i, o, bool(act_quant)))
    if hit is not None:
        return hit
    if bucket <= 64:
        # Small M is memory bound: a tuned neighbouring small bucket (same
        # device / shape / mode) is a better guess than the heuristic; only
        # block_m follows M.
        for nb in sorted((16, 32, 64), key=lambda b: abs(b.bit_length() -
                                                         bucket.bit_length())):
            hit = TUNED_BLOCK_SIZES.get((device, nb, i, o, bool(act_quant)))
            if hit is not None:
                return dataclasses.replace(hit, block_m=bucket)
    return default_block_sizes(m, i, o, act_quant, backend=backend,
                               device=device, x_itemsize=x_itemsize)
