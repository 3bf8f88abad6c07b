"""Drives a ``Scheduler`` without HTTP (shared by the serving tests)."""

from __future__ import annotations

import contextlib
import threading

from quasar_jax.serving.scheduler import Finished, Request, Tokens
from quasar_jax.serving.speculation import FixedPolicy


class CyclingPolicy:
    """Forces a switch of chunk program at every chunk (losslessness under any choice)."""

    def __init__(self, programs: int):
        self.programs, self.calls, self.used = programs, 0, []

    def choose(self, busy: int) -> int:
        self.calls += 1
        self.used.append(self.calls % self.programs)
        return self.used[-1]

    def observe(self, *args) -> None:
        pass


@contextlib.contextmanager
def fixed_speculation(scheduler):
    """The largest draft length for every chunk while inside: ``--speculation auto`` keeps outputs
    exact (greedy tokens, the distribution of sampled ones) but its timing-driven choice of K
    changes the random draws of a seeded request and the last float bits of logprobs (a verify
    step of another width), so tests that compare two requests bit for bit fix K."""
    auto, scheduler.policy = scheduler.policy, FixedPolicy(len(scheduler.engine.ks) - 1)
    try:
        yield
    finally:
        scheduler.policy = auto


def run_requests(scheduler, requests: list[Request], timeout: float = 300.0):
    """Submit every request at once; -> (generated ids of each, its last event)."""
    lock, done = threading.Lock(), threading.Event()
    ids = {r.rid: [] for r in requests}
    ends = {}

    def sink_for(req):
        def sink(event):
            with lock:
                if isinstance(event, Tokens):
                    ids[req.rid] += [t for group in event.groups for t in group]
                else:
                    ends[req.rid] = event
                    if len(ends) == len(requests):
                        done.set()
        return sink

    for req in requests:
        req.sink = sink_for(req)
        scheduler.submit(req)
    assert done.wait(timeout), f"{len(ends)} of {len(requests)} requests finished"
    assert all(isinstance(e, Finished) for e in ends.values()), ends
    return [ids[r.rid] for r in requests], [ends[r.rid] for r in requests]
