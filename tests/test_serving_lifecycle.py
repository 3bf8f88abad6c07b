"""Serving: queue bound (429), SIGTERM drain of a subprocess server, host-side text handling."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from quasar_jax.cli.text_stream import TextStream
from quasar_jax.serving.slots import prefill_pieces

REPO = Path(__file__).resolve().parents[1]


def test_prefill_pieces():
    assert prefill_pieces(0, (32, 128)) == []
    assert prefill_pieces(5, (32, 128)) == [(0, 32)]
    assert prefill_pieces(40, (32, 128)) == [(0, 128)]
    assert prefill_pieces(300, (32, 128)) == [(0, 128), (128, 128), (256, 128)]
    assert prefill_pieces(260, (32, 128)) == [(0, 128), (128, 128), (256, 32)]


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_stop_prefixes():
    ts = TextStream(_CharTokenizer(), ["END", "\n\n"])
    out = [ts.feed([ord(c)]) for c in "ab E"] + [ts.feed([ord("N")]), ts.feed([ord("x")])]
    assert "".join(out) == "ab ENx" and out[3] == "" and out[4] == ""  # "E", "EN" held back
    assert ts.feed([ord(c) for c in "yEND tail"]) == "y" and ts.stopped
    assert ts.feed([ord("z")]) == "" and ts.flush() == ""
    ts2 = TextStream(_CharTokenizer(), ["END"])
    assert ts2.feed([ord("E")]) == "" and ts2.flush() == "E"


STREAM_TEXTS = ["中文文本：你好，世界！😀 naïve — def f(x):\n    return x  # END of it", "import os\n\n\nclass A:\n    pass\n",
                "Ünïcödé ☃ snowman, 日本語のテキスト, and emoji 🎉🎉 at the end"]


def test_text_stream_equals_decoding_the_whole():
    """Fed in random groups, with stop strings that span tokens and multi-byte characters split
    over several tokens, the stream returns exactly the whole decode cut at the first stop string,
    and ``kept`` is the fewest ids whose decode holds it."""
    import random

    from quasar_jax.weights.loading import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir("demo"))
    rng = random.Random(0)
    for trial in range(60):
        text = rng.choice(STREAM_TEXTS)
        ids = tok(text)["input_ids"]
        full = tok.decode(ids, skip_special_tokens=True)
        assert full == text
        a = rng.randrange(len(full) - 4)
        stop = [full[a:a + rng.randint(1, 4)]] if trial % 3 else []
        include = trial % 2 == 0
        ts = TextStream(tok, stop, include_stop=include)
        out, at = [], 0
        while at < len(ids) and not ts.stopped:
            n = rng.randint(1, 4)
            out.append(ts.feed(ids[at:at + n]))
            at += n
        out.append(ts.flush())
        if stop:
            cut = full.index(stop[0]) + (len(stop[0]) if include else 0)
            assert "".join(out) == ts.text == full[:cut] and ts.stopped
            kept = next(n for n in range(1, len(ids) + 1) if stop[0] in tok.decode(ids[:n]))
            assert ts.kept == kept
        else:
            assert "".join(out) == ts.text == full and ts.kept == len(ids)


def test_text_stream_flushes_an_incomplete_character():
    from quasar_jax.weights.loading import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir("demo"))
    ids = tok("ab中")["input_ids"][:-1]  # the last character cut inside its bytes
    ts = TextStream(tok)
    assert ts.feed(ids) == "ab" and ts.flush() == tok.decode(ids)[2:] == "\ufffd"


@pytest.fixture(scope="module")
def paused(tiny_model_dir):
    """A server (1 slot, queue of 1) whose scheduler thread has not started: requests stay queued."""
    from quasar_jax.serving.api import Api, create_app
    from quasar_jax.serving.scheduler import Scheduler
    from quasar_jax.serving.server import ServerThread
    from quasar_jax.serving.slots import SlotEngine
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.weights.loading import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    engine = SlotEngine(model, make_drafter("ngram", num_draft=2), "float", slots=1, max_len=64, chunk_steps=2,
                        prefill_buckets=(8,))
    scheduler = Scheduler(engine, max_queue=1)
    api = Api(scheduler, tok, model_name="tiny", stop_ids=())
    server = ServerThread(create_app(api, on_shutdown=scheduler.stop)).start()
    yield server, scheduler
    server.stop()


def test_full_queue_answers_429(paused):
    server, scheduler = paused

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0}
            # a batch of three prompts is one request: queued whole on the queue of one place
            first = asyncio.create_task(c.post("/v1/completions", json={**body, "prompt": ["a", "b =", "c"]}))
            while scheduler.queued < 3:
                await asyncio.sleep(0.01)
            assert scheduler.waiting == 1
            second = await c.post("/v1/completions", json=body)
            assert second.status_code == 429, second.text
            assert second.headers["retry-after"] == "1"
            err = second.json()["error"]
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_exceeded"
            scheduler.start()  # the queued request now runs
            r = await first
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 15
            assert len(r.json()["choices"]) == 3
    asyncio.run(go())
    assert scheduler.metrics.requests.labels("rejected")._value.get() == 1


@pytest.mark.parametrize("flags, words", [
    (["--mesh", "2x2"], "argument --mesh: mesh spec '2x2': expected axis=size pairs"),
    (["--speculation", "fast"], "argument --speculation: speculation must be auto, off or a draft length K >= 0"),
    (["--speculation", "-1"], "speculation must be auto, off or a draft length K >= 0, got '-1'"),
    (["--mesh", "data=64"], "mesh data=64,model=1 needs 64 devices, but there are 1"),
    (["--max-len", "4096"], "--max-len 4096 is past the model's context of 2048 positions"),
])
def test_cli_rejects_bad_flags(flags, words):
    r = subprocess.run([sys.executable, "-m", "quasar_jax.serve", *flags], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_served_context_defaults_to_the_models():
    from quasar_jax.model.config import Qwen3Config
    from quasar_jax.serving.server import ServeConfig
    from quasar_jax.speculative.drafters import NGramDrafter

    config = Qwen3Config.from_json(REPO / "quasar_jax/assets/demo-qwen3/config.json")
    assert config.max_position_embeddings == 2048
    assert ServeConfig(NGramDrafter(3)).for_model(config).max_len == 2048
    assert ServeConfig(NGramDrafter(3), kv_layout="dense").for_model(config).max_len == 2048
    assert ServeConfig(NGramDrafter(3), max_len=512).for_model(config).max_len == 512
    with pytest.raises(ValueError, match="max_len 4096 is past the model's context of 2048 positions"):
        ServeConfig(NGramDrafter(3), max_len=4096).for_model(config)
    assert ServeConfig(NGramDrafter(3), max_len=4096, allow_long_context=True).for_model(config).max_len == 4096


def test_cli_plan_prints_the_memory_plan():
    r = subprocess.run([sys.executable, "-m", "quasar_jax.serve", "--plan", "--slots", "8", "--max-len", "512"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "batch 8 x 512 slots" in r.stdout and "fits" in r.stdout


def test_sigterm_drains_in_flight_and_exits(tiny_model_dir):
    from quasar_jax.serving.server import free_port

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "quasar_jax.serve", "--model", str(tiny_model_dir), "--slots", "2",
                             "--max-len", "160", "--num-draft", "2", "--prefill-chunk", "16", "--chunk-steps", "1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": str(tiny_model_dir), "prompt": "for i in range(10):", "max_tokens": 80,
                "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "[DONE]"
        final = json.loads(lines[-2])
        assert final["choices"][0]["finish_reason"] in ("stop", "length")
        assert final["usage"]["completion_tokens"] == 80 or final["choices"][0]["finish_reason"] == "stop"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
