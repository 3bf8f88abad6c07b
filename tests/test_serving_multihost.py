"""``python -m quasar_jax.serve`` as a two-process group (2 x 4 CPU devices, jax.distributed over
127.0.0.1): process 0 serves HTTP, process 1 follows in lockstep. The same tokens as one device
offline; SIGTERM on process 0 drains and ends both; a follower killed mid-request ends the group
with one line on process 0, no hang."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_hf_checkpoint, make_tiny_tokenizer
from quasar_jax.serving.server import free_port
from quasar_jax.speculative.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11, 12], [40, 3, 77, 21, 9, 60, 2],
           [1, 2, 1, 2, 1, 2, 1, 2, 1]]
BUDGETS = [18, 11, 15, 20]


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


class Group:
    """Two ``quasar_jax.serve`` processes forming one data=2,model=4 mesh."""

    def __init__(self, model_dir, tmp_path, *flags):
        self.port, coordinator = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = [tmp_path / f"process{i}.log" for i in (0, 1)]
        argv = [sys.executable, "-m", "quasar_jax.serve", "--model", str(model_dir), "--mesh", "data=2,model=4",
                "--slots", "4", "--max-len", "96", "--num-draft", "3", "--chunk-steps", "4", "--prefill-chunk", "16",
                "--port", str(self.port), "--coordinator-address", f"127.0.0.1:{coordinator}",
                "--num-processes", "2", *flags]
        self.procs = [subprocess.Popen(argv + ["--process-id", str(i)], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                       stderr=open(self.logs[i], "w")) for i in (0, 1)]

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for i, proc in enumerate(self.procs):
                assert proc.poll() is None, f"process {i} ended:\n{self.log(i)[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.log(0)[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny checkpoint with a tokenizer, its vocabulary padded to a multiple of the model axis."""
    d = tmp_path_factory.mktemp("multihost_model")
    tok = make_tiny_tokenizer(d)
    make_hf_checkpoint(d, tie=True, vocab_size=-(-len(tok) // 8) * 8, eos_token_id=tok.eos_token_id)
    return d


@pytest.fixture
def group(model_dir, tmp_path):
    made = []

    def start(*flags):
        made.append(Group(model_dir, tmp_path, *flags))
        made[-1].wait_ready()
        return made[-1]

    yield start
    for g in made:
        g.close()


def _complete(url, prompt, max_tokens, **kw):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_process_server_equals_one_device_and_drains(group, model_dir):
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    g = group()
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: _complete(g.url, *a), zip(PROMPTS, BUDGETS)))
    tok = load_tokenizer(model_dir)
    stop = stop_ids_of(tok, resolve_model_dir(str(model_dir)))
    engine = Engine(load_model(model_dir))
    for prompt, n, out in zip(PROMPTS, BUDGETS, got):
        want = engine.generate([prompt], GenerationConfig(max_new_tokens=n, drafter="none", stop_ids=stop)).tokens[0]
        assert out["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        assert out["usage"]["completion_tokens"] == len(want)
    # the logits stage's per-row settings reach the follower (else its digest would differ): n = 2
    # choices from one prefill with penalties, logit bias, min_tokens and logprobs; then echo alone
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, min_tokens=3, logit_bias={5: -100.0},
                            logprobs=2)
    want = engine.generate([PROMPTS[1]], GenerationConfig(max_new_tokens=12, drafter="none", stop_ids=stop),
                           sampling=[params])
    out = _complete(g.url, PROMPTS[1], 12, n=2, logprobs=2, repetition_penalty=1.3, presence_penalty=0.4,
                    min_tokens=3, logit_bias={"5": -100})
    for choice in out["choices"]:
        assert choice["text"] == tok.decode(want.tokens[0], skip_special_tokens=True)
        assert abs(np.array(choice["logprobs"]["token_logprobs"]) - [x.logprob for x in want.logprobs[0]]).max() < 1e-4
    echo = _complete(g.url, PROMPTS[2], 0, echo=True, logprobs=1)["choices"][0]["logprobs"]["token_logprobs"]
    assert len(echo) == len(PROMPTS[2]) and echo[0] is None and all(x < 0 for x in echo[1:])
    lines = []  # SIGTERM on process 0 mid-stream: the stream completes, then both processes exit 0
    body = {"prompt": PROMPTS[3], "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", g.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if len(lines) == 1:
                    g.procs[0].send_signal(signal.SIGTERM)
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert [p.wait(timeout=60) for p in g.procs] == [0, 0], g.log(0)[-2000:] + g.log(1)[-2000:]


def test_a_killed_follower_ends_the_group_with_one_line(group):
    g = group("--peer-timeout", "20", "--speculation", "3")
    body = {"prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0.8, "stream": True}
    events = []
    with httpx.stream("POST", g.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    t0 = time.monotonic()
                    g.procs[1].kill()  # mid-request
    assert g.procs[0].wait(timeout=60) == 3  # lockstep.EXIT_GROUP_LOST
    took = time.monotonic() - t0
    print(f"process 0 ended {took:.1f} s after the follower was killed")  # docs/serving.md (pytest -s)
    assert took < 20, took
    ended = [line for line in g.log(0).splitlines() if "ending the group" in line]
    assert len(ended) == 1 and ended[0].startswith("python -m quasar_jax.serve: process 0: "), g.log(0)[-3000:]
    assert "Traceback" not in g.log(0)
    assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]


def test_two_process_server_with_s4c_heads_equals_one_device(group, model_dir, tmp_path):
    """``--drafter s4c`` (heads with a draft vocabulary, whose LM head slice is gathered from the
    sharded model) and its tree forced (``--speculation 3``): the tokens of one device offline;
    SIGTERM on process 0 ends both."""
    from conftest import random_heads
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.speculative.heads import LoadedHeads, save_heads
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    model = load_model(model_dir)
    heads = random_heads(model, num_heads=3)
    ids = list(range(0, model.config.vocab_size, 2)) + [t for p in PROMPTS for t in p if t % 2]
    ids = list(dict.fromkeys(ids))
    meta = {**heads.meta, "draft_vocab": {"size": len(ids), "ids": ids}}
    save_heads(heads.module(), meta, tmp_path / "heads")
    g = group("--drafter", "s4c", "--heads", str(tmp_path / "heads"), "--speculation", "3")
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: _complete(g.url, *a), zip(PROMPTS, BUDGETS)))
    tok = load_tokenizer(model_dir)
    stop = stop_ids_of(tok, resolve_model_dir(str(model_dir)))
    engine = Engine(model)
    loaded = LoadedHeads(heads.module(), meta, None)
    for prompt, n, out in zip(PROMPTS, BUDGETS, got):
        want = engine.generate([prompt], GenerationConfig(max_new_tokens=n, drafter="none", stop_ids=stop)).tokens[0]
        assert out["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        s4c = engine.generate([prompt], GenerationConfig(max_new_tokens=n, drafter="s4c", heads=loaded, num_draft=3,
                                                         stop_ids=stop)).tokens[0]
        assert s4c == want
    g.procs[0].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=60) for p in g.procs] == [0, 0], g.log(0)[-2000:] + g.log(1)[-2000:]
    assert "Traceback" not in g.log(0) + g.log(1)


def test_two_process_paged_server_equals_one_device(group, model_dir):
    """Pages across processes: process 0's pages decide, the page tables, prefix loads and copies
    travel in the exchange; the same tokens as one device, and the shared prefix is a hit."""
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    g = group("--kv-layout", "paged", "--page-size", "8", "--kv-pages", "40", "--speculation", "3")
    shared = PROMPTS[0] + PROMPTS[1]  # 21 tokens: two full pages of 8
    prompts = [shared + [40, 3], shared + [77, 21, 9], shared + [1, 2, 1]]
    with cf.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: _complete(g.url, p, 14), prompts))
    again = _complete(g.url, prompts[0], 14, n=2)  # cached prefix loaded; two choices share its pages
    tok = load_tokenizer(model_dir)
    stop = stop_ids_of(tok, resolve_model_dir(str(model_dir)))
    engine = Engine(load_model(model_dir))
    for prompt, out in zip(prompts, got):
        want = engine.generate([prompt], GenerationConfig(max_new_tokens=14, drafter="none", stop_ids=stop)).tokens[0]
        assert out["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert [c["text"] for c in again["choices"]] == [got[0]["choices"][0]["text"]] * 2
    metrics = httpx.get(g.url + "/metrics", timeout=30).text
    hit = [line for line in metrics.splitlines() if line.startswith("quasar_kv_prefix_hit_tokens")]
    assert hit and float(hit[0].split()[-1]) >= 16, hit
    g.procs[0].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=60) for p in g.procs] == [0, 0], g.log(0)[-2000:] + g.log(1)[-2000:]
