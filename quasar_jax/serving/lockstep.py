"""Multi-host serving: every process runs the same device programs in the same order.

JAX's multi-controller runtime (``jax.distributed``) runs one program on devices of several
processes only when every process calls it, with the same arguments, in the same order. Process
0 runs HTTP and the scheduler; its ``SlotEngine`` calls (``begin``, ``extend``, ``prefill``,
``admit``, ``finish``, ``chunk``, ``reset``; on pages ``set_pages`` and the prefix and pages of
``begin`` / ``admit``) are wrapped by ``Leader``, which records each as an op (an ``Op`` code and
its host arguments) instead of running it. On a paged engine the pages are decided on process 0
(its ``SlotPages``) and travel as ops: the changed rows of the page tables (``PAGE_ROW``), the page
copies (``SET_PAGES``), a cached prefix to load (``PREFIX``), an admitted row's pages
(``ADMIT_PAGES``); every process keeps the same tables and the same pool. At the end of a scheduler
iteration (``flush``), at each ``chunk`` and each echo ``prefill`` (whose results the scheduler
needs) or when the buffer is full, the recorded ops go to every process in ONE fixed-size
exchange, and then every process, process 0 included, runs the decoded ops on its
``SlotEngine``. The other processes run ``follow``: exchange, run, repeat, until ``SHUTDOWN``.

The buffer (``Codec``): int32 words, ops one after another, each ``[code, n, n payload words]``,
zeros after the last. The payload is the op's argument pytree, leaf by leaf as raw bytes padded
to words, in the order of its abstract spec; the specs come from the engine (``row_spec`` is the
per-row input pytree of ``SlotState``: budget, stop ids and the whole ``RowSampling`` with
sampling, penalties, logit bias, min_tokens and logprobs count; ``key_spec`` the PRNG key data),
so a field added to the per-row inputs travels without a change here. A prompt travels as
``EXTEND`` ops of at most ``PIECE`` tokens (1/64 of the buffer if smaller); an op that does not fit
in what is left of the buffer is sent in the next exchange (a prompt longer than one buffer takes
several exchanges; no buffer is ever resized).

The exchange is one all-reduce over processes (``Exchange``, compiled once): process 0
contributes the buffer, and every process its status: how many chunks it has run and a digest
(CRC-32) of the last chunk's tokens, appended counts, done flags and finish reasons as its own
devices returned them. Every process compares the statuses; a difference ends the group on every
process with one line naming the chunk (``Diverged``). A peer that dies breaks the all-reduce (on
CPU, gloo reports the closed connection at once): the survivors' call raises, and they end with
one line (``GroupLost``); a peer that hangs (or a collective that never returns) is caught by the
``Watchdog`` after ``peer_timeout`` seconds. Process 0 exchanges at least every ``heartbeat_s``
seconds, also when idle. If process 0 itself dies, JAX's coordination service (which runs there)
ends the other processes at once with its own fatal message.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from quasar_jax.serving.slot_state import ChunkResult
from quasar_jax.serving.slots import SlotEngine

PIECE = 512  # prompt tokens per EXTEND op at most (fewer in a small buffer: 1/64 of it, so prompts
# share an exchange with admissions, whose per-row settings take ~620 words with the logit bias)
EXIT_GROUP_LOST = 3


class Op(enum.IntEnum):
    BEGIN = 1  # () a new staged prompt
    EXTEND = 2  # (tokens [PIECE], n) more of its tokens
    PREFILL = 3  # (start, size, logprobs)
    ADMIT = 4  # (slot, row pytree, key data)
    FINISH = 5  # (mask [B],)
    CHUNK = 6  # (program, logprobs)
    RESET = 7  # ()
    SHUTDOWN = 8  # ()
    PREFIX = 9  # (pages [M], n) paged: the staged prompt's cached prefix pages (after BEGIN)
    ADMIT_PAGES = 10  # (pages [M], from_page) paged: the pages of the next ADMIT's slot
    PAGE_ROW = 11  # (slot, pages [M]) paged: a row of the page tables changed
    SET_PAGES = 12  # (src [C], dst [C], n) paged: page copies, then the tables for the next chunks


class GroupLost(RuntimeError):
    """A peer process is gone, or the processes diverged: the group cannot go on."""

    fatal = True  # the scheduler stops for good (scheduler.Scheduler)


class Codec:
    """Ops <-> int32 words; the argument specs of each op come from the engine."""

    def __init__(self, engine: SlotEngine, words: int):
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        self.words, self.piece = words, max(1, min(PIECE, words // 64))
        self.specs = {Op.BEGIN: (), Op.EXTEND: (jax.ShapeDtypeStruct((self.piece,), jnp.int32), i32),
                      Op.PREFILL: (i32, i32, i32), Op.ADMIT: (i32, engine.row_spec, engine.key_spec),
                      Op.FINISH: (jax.ShapeDtypeStruct((engine.b,), jnp.bool_),), Op.CHUNK: (i32, i32),
                      Op.RESET: (), Op.SHUTDOWN: ()}
        # Paged engines: page numbers decided by process 0's SlotPages travel with the ops.
        row = jax.ShapeDtypeStruct((getattr(engine, "max_pages", 1),), jnp.int32)
        self.copies = max(1, min(2 * engine.b, words // 16))  # page copies per SET_PAGES op
        copies = jax.ShapeDtypeStruct((self.copies,), jnp.int32)
        self.specs.update({Op.PREFIX: (row, i32), Op.ADMIT_PAGES: (row, i32), Op.PAGE_ROW: (i32, row),
                           Op.SET_PAGES: (copies, copies, i32)})
        largest = max(len(self.encode(op, self._zeros(op))) for op in Op)
        if largest > words:
            raise ValueError(f"the lockstep buffer of {words} words cannot hold one op of {largest} words")

    def _zeros(self, op: Op):
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.specs[op])

    def encode(self, op: Op, args) -> np.ndarray:
        leaves, specs = jax.tree.leaves(args), jax.tree.leaves(self.specs[op])
        if len(leaves) != len(specs):
            raise ValueError(f"op {op.name}: {len(leaves)} arguments for a spec of {len(specs)}")
        payload = b"".join(_padded(np.asarray(x, s.dtype).reshape(s.shape).tobytes()) for x, s in zip(leaves, specs))
        body = np.frombuffer(payload, np.int32)
        return np.concatenate([np.array([int(op), len(body)], np.int32), body])

    def decode(self, buffer: np.ndarray) -> list[tuple[Op, object]]:
        ops, at = [], 0
        while at + 2 <= len(buffer) and buffer[at] != 0:
            op, n = Op(int(buffer[at])), int(buffer[at + 1])
            raw, leaves, pos = buffer[at + 2:at + 2 + n].tobytes(), [], 0
            specs, tree = jax.tree.flatten(self.specs[op])
            for s in specs:
                size = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
                leaves.append(np.frombuffer(raw[pos:pos + size], s.dtype).reshape(s.shape).copy())
                pos += len(_padded(b"\0" * size))
            ops.append((op, jax.tree.unflatten(tree, leaves)))
            at += 2 + n
        return ops


def _padded(raw: bytes) -> bytes:
    return raw + b"\0" * (-len(raw) % 4)


class Exchange:
    """One all-reduce over processes: process 0's buffer plus every process's status (compiled once)."""

    def __init__(self, words: int):
        self.n, self.me, self.words = jax.process_count(), jax.process_index(), words
        devices = np.array(jax.devices()).reshape(self.n, jax.local_device_count())
        mesh = Mesh(devices, ("processes", "local"))
        self.width = words + 2 * self.n
        self._in = NamedSharding(mesh, P("processes"))
        abstract = jax.ShapeDtypeStruct((self.n, self.width), jnp.int32, sharding=self._in)
        self._sum = jax.jit(lambda x: jnp.sum(x, axis=0),
                            out_shardings=NamedSharding(mesh, P())).lower(abstract).compile()

    def __call__(self, buffer: np.ndarray | None, status: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """-> (process 0's buffer, ``[processes, 2]`` statuses)."""
        row = np.zeros((1, self.width), np.int32)
        if buffer is not None:
            row[0, :len(buffer)] = buffer
        row[0, self.words + 2 * self.me:self.words + 2 * self.me + 2] = status
        glob = jax.make_array_from_callback((self.n, self.width), self._in, lambda idx: row)
        out = np.asarray(self._sum(glob).addressable_data(0))
        return out[:self.words], out[self.words:].reshape(self.n, 2)


class Watchdog:
    """Ends this process with one line when a group call runs longer than its timeout."""

    def __init__(self, prog: str):
        self.prog, self._what, self._deadline = prog, None, None
        threading.Thread(target=self._watch, name="quasar-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float):
        self._what, self._deadline = what, time.monotonic() + timeout
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self):
        while True:
            time.sleep(0.2)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                end_group(self.prog, f"no answer from the other processes for too long in {self._what}: "
                                     "a peer is gone or hangs")


def end_group(prog: str, message: str, delay: float = 0.0) -> None:
    """One line on stderr, then exit (after ``delay`` seconds, e.g. for error responses to reach
    clients) without the interpreter's shutdown: JAX's shutdown barrier would wait for the lost
    peer and then abort with its own message."""
    sys.stderr.write(f"{prog}: process {jax.process_index()}: {message}; ending the group\n")
    sys.stderr.flush()
    if delay > 0:
        threading.Timer(delay, os._exit, (EXIT_GROUP_LOST,)).start()
    else:
        os._exit(EXIT_GROUP_LOST)


def digest(res: ChunkResult) -> int:
    data = b"".join(np.ascontiguousarray(x).tobytes() for x in (res.tokens, res.appended, res.done, res.finish))
    return zlib.crc32(data) & 0x7FFFFFFF


class _Member:
    """What every process of the group shares: the engine, the exchange, the status, the checks."""

    def __init__(self, engine: SlotEngine, *, words: int, peer_timeout: float, prog: str):
        self.engine, self.prog, self.peer_timeout = engine, prog, peer_timeout
        self.codec = Codec(engine, words)
        self.exchange = Exchange(words)
        self.watchdog = Watchdog(prog)
        self.chunks, self.last = 0, 0  # chunks run, digest of the last one
        self._admit_pages = ()  # paged: (pages, from_page) of the next ADMIT

    def swap(self, buffer: np.ndarray | None, timeout: float) -> np.ndarray:
        """One exchange; raises ``GroupLost`` if a peer is gone or the statuses differ."""
        try:
            with self.watchdog.guard("the exchange", timeout):
                out, statuses = self.exchange(buffer, (self.chunks, self.last))
        except Exception as err:
            raise GroupLost(f"lost contact with the other processes: the exchange failed ({_first_line(err)})") from None
        for pid, (chunks, dig) in enumerate(statuses):
            if (chunks, dig) != tuple(statuses[0]):
                raise GroupLost(f"process {pid} diverged at chunk {max(chunks, statuses[0][0])}: its tokens "
                                f"(digest {dig:#x} after {chunks} chunks) differ from process 0's "
                                f"({statuses[0][1]:#x} after {statuses[0][0]})")
        return out

    def run(self, ops):
        """Run decoded ops on this process's engine; the last result (a chunk's, or an echo
        prefill's logprobs), or None."""
        result = None
        try:
            with self.watchdog.guard("a device program", self.peer_timeout):
                for op, args in ops:
                    result = self._run(op, args) or result
        except GroupLost:
            raise
        except Exception as err:  # a collective broke under a device program
            raise GroupLost(f"a device program failed, a peer is likely gone ({_first_line(err)})") from None
        return result

    def _run(self, op: Op, args):
        eng = self.engine
        if op is Op.BEGIN:
            eng.begin()
        elif op is Op.PREFIX:
            eng.load_prefix(args[0][:int(args[1])])
        elif op is Op.ADMIT_PAGES:  # for the next ADMIT (the row comes padded with the dropped page P)
            self._admit_pages = (args[0], int(args[1]))
        elif op is Op.PAGE_ROW:
            eng._table[int(args[0])] = args[1]
        elif op is Op.SET_PAGES:
            n = int(args[2])
            eng.set_pages(eng._table, list(zip(args[0][:n].tolist(), args[1][:n].tolist())))
        elif op is Op.EXTEND:
            eng.extend(args[0][:int(args[1])])
        elif op is Op.PREFILL:
            return eng.prefill(int(args[0]), int(args[1]), logprobs=bool(args[2]))
        elif op is Op.ADMIT:
            pages, self._admit_pages = self._admit_pages, ()
            eng.admit(int(args[0]), args[1], args[2], *pages)
        elif op is Op.FINISH:
            eng.finish(args[0])
        elif op is Op.CHUNK:
            res = eng.chunk(int(args[0]), logprobs=bool(args[1]))
            self.chunks, self.last = self.chunks + 1, digest(res)
            return res
        elif op is Op.RESET:
            eng.reset()
        return None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Leader(_Member):
    """Process 0's ``SlotEngine`` calls, recorded and sent to the group (same interface)."""

    def __init__(self, engine: SlotEngine, *, words: int = 8192, peer_timeout: float = 60.0,
                 heartbeat_s: float = 1.0, prog: str = "quasar_jax.serve"):
        super().__init__(engine, words=words, peer_timeout=peer_timeout, prog=prog)
        self.heartbeat_s = heartbeat_s
        self._pending: list[np.ndarray] = []
        self._used = 0
        self._last = time.monotonic()  # of the last exchange
        # the page tables as every process has them (paged engines; sent as changed rows)
        self._tables = np.array(getattr(engine, "_table", np.zeros((engine.b, 0))), np.int32)

    def __getattr__(self, name):  # b, s, k, ks, buckets, drafters, model, row_inputs, key_data ...
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def _add(self, op: Op, args=()) -> None:
        words = self.codec.encode(op, args)
        if self._used + len(words) > self.codec.words:
            self.flush()
        self._pending.append(words)
        self._used += len(words)

    def flush(self):
        """Send the recorded ops to every process, then run them here (-> the last result, see
        ``run``). With none recorded, an empty exchange (a heartbeat) only when the last one is
        ``heartbeat_s`` old."""
        if not self._pending and time.monotonic() - self._last < self.heartbeat_s:
            return None
        self._last = time.monotonic()
        buffer = np.zeros((self.codec.words,), np.int32)
        if self._pending:
            body = np.concatenate(self._pending)
            buffer[:len(body)] = body
        self._pending, self._used = [], 0
        return self.run(self.codec.decode(self.swap(buffer, self.peer_timeout)))

    def begin(self, prompt=(), prefix_pages=()) -> None:
        self._add(Op.BEGIN)
        if len(prefix_pages):
            self._add(Op.PREFIX, (self.engine._row_table(prefix_pages), np.int32(len(prefix_pages))))
        self.extend(prompt)

    def extend(self, tokens) -> None:
        tokens, size = np.asarray(tokens, np.int32), self.codec.piece
        for i in range(0, len(tokens), size):
            piece = np.zeros((size,), np.int32)
            part = tokens[i:i + size]
            piece[:len(part)] = part
            self._add(Op.EXTEND, (piece, np.int32(len(part))))

    def prefill(self, start: int, size: int, logprobs: bool = False):
        self._add(Op.PREFILL, (np.int32(start), np.int32(size), np.int32(logprobs)))
        return self.flush() if logprobs else None  # the scheduler needs the echo's logprobs now

    def admit(self, slot: int, row, key_data, pages=None, from_page: int = 0) -> None:
        if pages is not None:
            table_row = self.engine._row_table(pages)
            self._add(Op.ADMIT_PAGES, (table_row, np.int32(from_page)))
            self._tables[slot] = table_row  # admit sets the slot's row on every process
        self._add(Op.ADMIT, (np.int32(slot), row, key_data))

    def set_pages(self, table, copies=()) -> None:
        """The page tables' changed rows, then the copies (in ops of ``codec.copies``), then the
        tables set for the next chunks, on every process."""
        table = np.asarray(table, np.int32)
        for slot in np.flatnonzero((table != self._tables).any(axis=1)):
            self._add(Op.PAGE_ROW, (np.int32(slot), table[slot]))
        self._tables = table.copy()
        copies, c = list(copies), self.codec.copies
        for i in range(0, max(len(copies), 1), c):
            part = copies[i:i + c]
            src, dst = np.zeros((c,), np.int32), np.zeros((c,), np.int32)
            src[:len(part)] = [a for a, _ in part]
            dst[:len(part)] = [b for _, b in part]
            self._add(Op.SET_PAGES, (src, dst, np.int32(len(part))))

    def finish(self, mask) -> None:
        self._add(Op.FINISH, (np.asarray(mask, bool),))

    def reset(self) -> None:
        self._add(Op.RESET)

    def chunk(self, program: int = 0, logprobs: bool = False) -> ChunkResult:
        self._add(Op.CHUNK, (np.int32(program), np.int32(logprobs)))
        return self.flush()

    def close(self) -> None:
        """Every process leaves its loop (after the last recorded ops)."""
        self._add(Op.SHUTDOWN)
        self.flush()


def follow(engine: SlotEngine, *, words: int = 8192, peer_timeout: float = 60.0, startup_timeout: float = 900.0,
           prog: str = "quasar_jax.serve") -> int:
    """A non-0 process: run what process 0 sends until it says SHUTDOWN (exit status 0), or end
    the group with one line (``EXIT_GROUP_LOST``)."""
    member = _Member(engine, words=words, peer_timeout=peer_timeout, prog=prog)
    timeout = startup_timeout  # process 0 loads its tokenizer and calibrates first
    try:
        while True:
            ops = member.codec.decode(member.swap(None, timeout))
            timeout = peer_timeout
            if any(op is Op.SHUTDOWN for op, _ in ops):
                member.run([(op, a) for op, a in ops if op is not Op.SHUTDOWN])
                return 0
            member.run(ops)
    except GroupLost as err:
        end_group(prog, str(err))
    return EXIT_GROUP_LOST
