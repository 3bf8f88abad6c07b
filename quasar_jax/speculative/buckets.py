"""The static shapes generation programs are compiled for: prompts and caches padded to buckets.

A compiled program is specialised to its prompt length P and cache length S; padding both up to a
multiple of a bucket lets calls with nearby lengths share one program (coarser buckets: fewer
programs, more padded work).
"""

from __future__ import annotations

PROMPT_BUCKET = 32  # default prompt padding multiple
CACHE_BUCKET = 128  # default cache lengths are rounded up to a multiple of this


def round_up(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is ``>= n``."""
    return -(-n // k) * k
