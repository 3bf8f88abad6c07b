"""The OpenAI-compatible server against a live uvicorn on localhost (demo model, float32).

One server per test process (conftest's ``demo_server``: 4 slots, small cache), shared with
test_serving_api.py; requests are few and short.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import httpx
import jax
import pytest

openai = pytest.importorskip("openai")

from conftest import DEMO_MAX_LEN as MAX_LEN
from slot_driver import fixed_speculation
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):",
           "for i in range(10):", "x = [", "    return self._", "# Copyright 2001 Python Software Foundation\n",
           "def __repr__(self):\n        return", "with open(filename) as f:"]
MAX_TOKENS = [24, 40, 17, 30, 9, 33, 21, 28]


@pytest.fixture(scope="module")
def served(demo_server):
    return demo_server


def _post(url, body, path="/v1/completions"):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=30)


def test_greedy_concurrent_equals_engine_generate(served):
    """8 interleaved requests (4 slots: some wait, some start as others leave), half streaming,
    equal offline Engine.generate token for token."""
    import quasar_jax as qj

    tok, client = served["tok"], served["client"]

    def one(i):
        kw = dict(model="demo", prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0)
        if i % 2:
            chunks = list(client.completions.create(stream=True, **kw))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].usage.completion_tokens
        r = client.completions.create(**kw)
        return r.choices[0].text, r.usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = qj.Engine(served["model"])
    for i in range(8):  # each prompt on its own, as offline decoding would run it
        cfg = qj.GenerationConfig(max_new_tokens=MAX_TOKENS[i], drafter="ngram", num_draft=3,
                                  stop_ids=served["stop_ids"], max_len=MAX_LEN)
        want = engine.generate([ids[i]], cfg).tokens[0]
        assert got[i][0] == tok.decode(want, skip_special_tokens=True), i
        assert got[i][1] == len(want)


def test_chat_stream_and_usage(served):
    client = served["client"]
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    u = r.usage.model_dump()
    assert u["completion_tokens"] <= 12 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["accepted_tokens"] == u["completion_tokens"] - u["verify_steps"] >= 0
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == u["completion_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_seeded_sampling_reproducible_and_stop_strings(served):
    """With a fixed draft length a seed reproduces its text (``slot_driver.fixed_speculation``)."""
    with fixed_speculation(served["scheduler"]):
        _seeded_and_stop_strings(served["client"])


def _seeded_and_stop_strings(client):
    kw = dict(model="demo", prompt="class Stack:", max_tokens=30, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"top_k": 50})
    a = client.completions.create(**kw).choices[0].text
    with cf.ThreadPoolExecutor(3) as pool:  # with neighbours in other slots: the same text
        others = [pool.submit(client.completions.create, model="demo", prompt=p, max_tokens=20, temperature=1.0)
                  for p in PROMPTS[:2]]
        b = client.completions.create(**kw).choices[0].text
        [f.result() for f in others]
    assert a == b
    full = client.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=40, temperature=0)
    text = full.choices[0].text
    assert "\n" in text.strip("\n")
    stop = text.strip("\n").split("\n")[1][:3] or "\n"
    cut = client.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=40, temperature=0,
                                    stop=[stop, "@@never@@"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = client.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=40,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ("[1, 2]", None),
    ({"model": "demo", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "demo", "prompt": "x", "max_tokens": MAX_LEN}, "max_tokens"),
    ({"model": "demo", "prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"model": "demo", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "demo", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "demo", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "demo", "prompt": "x", "n": 0}, "n"),
    ({"model": "demo", "prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ({"model": "demo", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "demo", "prompt": "x", "tools": []}, "tools"),
    ({"model": "demo", "prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"model": "demo", "prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"model": "demo", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "demo", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "demo", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "demo", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "demo", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "demo", "prompt": "x", "stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids"),
    ({"model": "demo", "prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"model": "demo", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"model": "demo", "prompt": ["x", 5]}, "prompt"),
    ({"model": "demo", "prompt": "x", "n": 100, "best_of": None, "echo": True, "max_tokens": 0,
      "logprobs": 1, "seed": 2**64}, "seed"),
    ({"model": "demo", "prompt": "x " * (MAX_LEN + 10)}, "prompt"),
    ({"model": "demo", "prompt": ""}, "prompt"),
    ({"model": "demo", "prompt": [1, 2, 10**9]}, "prompt"),
    ({"model": "demo"}, "prompt"),
])
def test_bad_completion_requests_get_400(served, body, param):
    r = _post(served["url"], body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]


def test_bad_chat_and_model_requests(served):
    url = served["url"]
    for body in ({"model": "demo", "messages": []}, {"model": "demo", "messages": [{"role": "robot", "content": "x"}]},
                 {"model": "demo", "messages": "hi"}):
        r = _post(url, body, "/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text
    msgs = [{"role": "user", "content": "x"}]
    for body, param in [({"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": msgs, "echo": True}, "echo"),
                        ({"messages": msgs, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content")]:
        r = _post(url, body, "/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = _post(url, {"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        served["client"].completions.create(model="demo", prompt="x", max_tokens=-1)
    # the server still serves after the bad requests
    assert served["client"].completions.create(model="demo", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_models_health_metrics(served):
    url = served["url"]
    assert [m.id for m in served["client"].models.list().data] == ["demo"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    for name in ("quasar_requests_total", "quasar_generated_tokens_total", "quasar_verify_steps_total",
                 "quasar_accepted_length_bucket", "quasar_time_to_first_token_seconds_bucket",
                 "quasar_time_per_output_token_seconds_bucket", "quasar_queue_depth", "quasar_slots_busy",
                 "quasar_slots_total 4.0"):
        assert name in text, name


def test_context_limit(served):
    """The served context (prompt + completion) is reported by /v1/models, enforced with vLLM's
    400 naming both numbers, and given whole to a chat request without max_tokens."""
    url, client = served["url"], served["client"]
    assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == MAX_LEN
    prompt = [5] * 40
    r = _post(url, {"model": "demo", "prompt": prompt, "max_tokens": MAX_LEN - 39})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_LEN} tokens" in err["message"] and "40 input tokens" in err["message"]
    assert _post(url, {"model": "demo", "prompt": prompt, "max_tokens": MAX_LEN - 40}).status_code == 200
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Count to ten."}],
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == MAX_LEN


def _open(url: str, body: dict) -> socket.socket:
    """A POST sent on a raw socket, the answer not read (closing it is the client going away)."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(data), data))
    return sock


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_disconnects_free_slots_and_queue_places(served):
    """Streaming and non-streaming, running and queued: a client that goes away is cancelled at the
    scheduler's next iteration (no quiet interval needed: the running ones keep producing tokens),
    its slot or queue place freed and the outcome counted."""
    url, scheduler = served["url"], served["scheduler"]
    metrics = scheduler.metrics
    cancelled = metrics.requests.labels("cancelled")._value.get
    long = {"model": "demo", "prompt": "import os\n", "max_tokens": MAX_LEN - 8, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}
    before, made = cancelled(), metrics.generated_tokens._value.get()
    running = []
    for stream in (True, False, True, False):
        running.append(_open(url, {**long, "stream": stream}))
        _wait(lambda: scheduler.busy == len(running))
    queued = [_open(url, {**long, "stream": stream}) for stream in (True, False)]
    _wait(lambda: scheduler.queued == 2)
    t0 = time.monotonic()
    for sock in queued + running:
        sock.close()
    _wait(lambda: scheduler.busy == 0 and scheduler.queued == 0)
    freed_s = time.monotonic() - t0
    assert cancelled() == before + 6
    assert metrics.generated_tokens._value.get() - made < 4 * (MAX_LEN - 8)  # the running ones were cut short
    print(f"\nsix disconnects (2 queued, 4 running) freed in {freed_s:.3f} s")
    assert served["client"].completions.create(model="demo", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_request_body_limit_answers_413(served):
    api = served["api"]
    limit, api.max_request_bytes = api.max_request_bytes, 2000
    try:
        body = json.dumps({"model": "demo", "prompt": "x" * 3000, "max_tokens": 1}).encode()
        r = httpx.post(served["url"] + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        chunked = httpx.post(served["url"] + "/v1/completions", content=iter([body[:1500], body[1500:]]),
                             headers={"content-type": "application/json"})  # no Content-Length: counted
        assert chunked.status_code == 413, chunked.text
    finally:
        api.max_request_bytes = limit


def test_no_compilation_after_first_request(served):
    client = served["client"]
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    client.completions.create(model="demo", prompt="def f():", max_tokens=4, temperature=0)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda kw: client.completions.create(model="demo", **kw), [
                dict(prompt="a" * 150, max_tokens=5, temperature=0.7, seed=3),
                dict(prompt="while True:\n    pass\n" * 3, max_tokens=11, temperature=0, stop=["\n"]),
                dict(prompt="print(", max_tokens=7, top_p=0.5, extra_body={"top_k": 3}),
                dict(prompt=[1, 2, 3], max_tokens=3),
                dict(prompt="x = 1", max_tokens=3, logprobs=2, echo=True, n=2, seed=5, presence_penalty=0.5,
                     logit_bias={"7": 2.0}, extra_body={"min_tokens": 1, "repetition_penalty": 1.2, "min_p": 0.1}),
                dict(prompt=["y", "z = ("], max_tokens=0, echo=True, logprobs=1),
            ]))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
