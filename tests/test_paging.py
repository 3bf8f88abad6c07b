"""Host page management (quasar_jax.paging): pool, prefix index, page tables, against brute force.

A simulated device stores the token id each slot's K/V stands for; after every random operation
each row must read back, through its page table, exactly its own tokens.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from quasar_jax.paging import OutOfPages, PagePool, PageTables, PrefixIndex, page_hashes


def test_pool_refcounts_and_lru_eviction():
    evicted = []
    pool = PagePool(4, on_evict=evicted.append)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1
    pool.register(0), pool.register(1)
    for p in a:
        pool.release(p)
    assert pool.num_cached == 2 and pool.num_free == 2  # page 2 was not registered: free
    pool.retain(1)  # a cached page shared again leaves the LRU
    got = pool.allocate(3)  # 2 free, then the least recently used cached page (0)
    assert evicted == [0] and pool.evictions == 1 and sorted(got) == [0, 2, 3]
    with pytest.raises(OutOfPages):
        pool.allocate(1)
    pool.check()
    with pytest.raises(ValueError):
        pool.release(got[0]) or pool.release(got[0])


def test_hash_chain_names_the_whole_prefix():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = page_hashes([9, 9, 3, 4, 5, 6], 2)
    assert len(a) == 3 and len(b) == 3
    assert a[1] != b[1]  # same page tokens, different prefix
    assert page_hashes([1, 2, 3, 4], 2) == a[:2]
    idx = PrefixIndex()
    assert idx.insert(a[0], 5) and not idx.insert(a[0], 6) and idx.match(a) == [5]


def test_prefix_hit_fork_copy_on_write():
    t = PageTables(num_pages=16, page_size=4, rows=3, max_pages_per_row=4)
    prompt = list(range(10))
    assert t.admit(0, prompt, reusable=9) == 0
    assert t.reserve(0, 0, 11) == []  # 3 pages
    t.commit(0, prompt, 9)  # slots 0..8 final: pages 0, 1 indexed
    assert t.admit(1, prompt + [50, 51], reusable=11) == 8  # two pages found
    assert t.pages(1) == t.pages(0)[:2]
    t.fork(0, 2)  # n > 1: share everything, partial page 2 included
    copies = t.reserve(2, 9, 12)  # writes in page 2 (shared): copy on write
    assert len(copies) == 1 and copies[0][0] == t.pages(0)[2] and t.pages(2)[2] == copies[0][1]
    assert t.pages(2)[:2] == t.pages(0)[:2]
    assert t.stats()["prefix_hit_tokens"] == 8


def test_prefix_caching_off_finds_nothing():
    t = PageTables(num_pages=8, page_size=2, rows=2, max_pages_per_row=4, prefix_caching=False)
    t.admit(0, [1, 2, 3, 4, 5], 4), t.reserve(0, 0, 5), t.commit(0, [1, 2, 3, 4, 5], 4), t.free(0)
    assert t.admit(1, [1, 2, 3, 4, 5], 4) == 0 and t.pool.num_cached == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_against_a_simulated_device(seed):
    rng = random.Random(seed)
    page, rows, m = 4, 4, 6
    t = PageTables(num_pages=14, page_size=page, rows=rows, max_pages_per_row=m)
    device = {}  # (page, offset) -> token id its K/V stands for
    seqs: dict[int, list[int]] = {}  # row -> tokens whose K/V is committed (slots 0..len-1)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(3, 13))] for _ in range(3)]

    def write(row, start, toks):
        for i, tok in enumerate(toks):
            s = start + i
            if s < m * page:
                device[(int(t.table[row, s // page]), s % page)] = tok

    def reserve(row, start, end):
        for src, dst in t.reserve(row, start, end):
            for o in range(page):
                if (src, o) in device:
                    device[(dst, o)] = device[(src, o)]

    for _ in range(300):
        op = rng.random()
        free_rows = [r for r in range(rows) if r not in seqs]
        try:
            if op < 0.3 and free_rows:  # admit: cached prefix + prefill of the rest
                row = free_rows[0]
                prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 6))]
                cached = t.admit(row, prompt, reusable=len(prompt) - 1)
                try:
                    reserve(row, cached, len(prompt) - 1)
                except OutOfPages:
                    t.free(row)
                    raise
                write(row, cached, prompt[cached:len(prompt) - 1])
                seqs[row] = prompt[:len(prompt) - 1]
                t.commit(row, seqs[row], len(seqs[row]))
            elif op < 0.4 and free_rows and seqs:  # fork
                src = rng.choice(list(seqs))
                t.fork(src, free_rows[0])
                seqs[free_rows[0]] = list(seqs[src])
            elif op < 0.85 and seqs:  # a verify chunk: K+1 written, some accepted, the rest rejected
                row = rng.choice(list(seqs))
                n = len(seqs[row])
                k1 = rng.randrange(1, 5)
                if n + k1 > m * page:
                    continue
                reserve(row, n, n + k1)
                chunk = [rng.randrange(50) for _ in range(k1)]
                write(row, n, chunk)
                seqs[row] += chunk[:rng.randrange(1, k1 + 1)]
                t.commit(row, seqs[row], len(seqs[row]))
            elif seqs:  # finish (or preempt) a row
                row = rng.choice(list(seqs))
                t.free(row)
                del seqs[row]
        except OutOfPages:
            if seqs:  # preempt the youngest-looking row
                row = max(seqs)
                t.free(row)
                del seqs[row]
        t.pool.check()
        for row, toks in seqs.items():
            got = [device.get((int(t.table[row, s // page]), s % page)) for s in range(len(toks))]
            assert got == toks, (seed, row)
        used = {p for r in seqs for p in t.pages(r)}
        assert all(t.pool.refcount[p] > 0 for p in used)
        assert sum(t.pool.refcount) == sum(len(t.pages(r)) for r in seqs)  # no leak
    assert t.hit_tokens > 0 and t.pool.evictions >= 0


def test_paging_imports_no_jax():
    code = "import sys, quasar_jax.paging; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
