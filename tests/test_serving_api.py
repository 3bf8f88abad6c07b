"""The API dialect with the official ``openai`` client (vLLM's fields through ``extra_body``):
logprobs and echo (against transformers' log_softmax), n choices, batched prompts, penalties and
vLLM's extension parameters, and the request bodies real tools send (lm-evaluation-harness,
vLLM's benchmark). Shares conftest's ``demo_server`` with test_serving.py.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from slot_driver import fixed_speculation

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

PROMPT = "def fibonacci(n):"
TOL = 2e-3  # float32 logprobs against transformers
WORST = {}  # max |difference| per kind, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module")
def srv(demo_server):
    """The shared server with a fixed draft length: these tests compare requests bit for bit
    (``slot_driver.fixed_speculation``)."""
    with fixed_speculation(demo_server["scheduler"]):
        yield demo_server


@pytest.fixture(scope="module")
def hf_logprobs():
    from transformers import AutoModelForCausalLM

    from quasar_jax.weights.loading import resolve_model_dir

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir("demo"), dtype=torch.float32).eval()

    def logprobs(ids):  # [T, V]: row t is the distribution of token t+1
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()

    yield logprobs
    print("\nmax |logprob difference| vs transformers:", WORST)


def _worst(kind, got, want):
    d = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)))) if len(got) else 0.0
    WORST[kind] = max(WORST.get(kind, 0.0), d)
    assert d < TOL, (kind, d)


def _greedy(client, **kw):
    return client.completions.create(model="demo", temperature=0, **kw)


def _ids(pieces):
    return [int(t.split(":")[1]) for t in pieces]  # return_tokens_as_token_ids: "token_id:N"


def test_completion_logprobs_and_echo_equal_transformers(srv, hf_logprobs):
    client, tok = srv["client"], srv["tok"]
    ids = tok(PROMPT)["input_ids"]
    r = _greedy(client, prompt=PROMPT, max_tokens=6, logprobs=3, echo=True)
    c, lp = r.choices[0], r.choices[0].logprobs
    assert c.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:j])) for j in range(len(lp.tokens))]
    exact = _greedy(client, prompt=PROMPT, max_tokens=6, logprobs=3, echo=True,
                    extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    all_ids = _ids(exact.tokens)
    assert all_ids[:len(ids)] == ids and exact.token_logprobs == lp.token_logprobs
    ref = hf_logprobs(all_ids)
    _worst("echo", lp.token_logprobs[1:len(ids)], ref[np.arange(len(ids) - 1), ids[1:]])
    _worst("generation", lp.token_logprobs[len(ids):],
           ref[np.arange(len(ids) - 1, len(all_ids) - 1), all_ids[len(ids):]])
    for j, top in enumerate(lp.top_logprobs[1:], start=1):  # the 3 most likely and the chosen token
        assert len(top) in (3, 4) and top[lp.tokens[j]] == lp.token_logprobs[j]
        _worst("top", sorted(top.values(), reverse=True)[:3], np.sort(ref[j - 1])[::-1][:3])
    gen = _greedy(client, prompt=PROMPT, max_tokens=6, logprobs=3).choices[0]
    assert PROMPT + gen.text == c.text and gen.logprobs.token_logprobs == lp.token_logprobs[len(ids):]
    assert gen.logprobs.text_offset[0] == 0
    # greedy: each generated token is its position's most likely one
    assert all(g == max(t.values()) for g, t in zip(gen.logprobs.token_logprobs, gen.logprobs.top_logprobs))
    # echo alone: max_tokens 0 returns the prompt, no slot needed
    only = _greedy(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(ids)], abs=1e-5)
    streamed = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                              echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == c.text
    assert [x for ch in streamed if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs


def test_lm_eval_loglikelihood_request(srv, hf_logprobs):
    """lm-evaluation-harness's local-completions body: a batch of token-id prompts, echo, one
    logprob, max_tokens 1; it reads token_logprobs[ctxlen:-1] of each choice sorted by index."""
    tok = srv["tok"]
    ctx, conts = tok("x = ")["input_ids"], [tok(" 1")["input_ids"], tok(" [")["input_ids"]]
    body = {"model": "demo", "prompt": [ctx + c for c in conts], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    out = httpx.post(srv["url"] + "/v1/completions", json=body, timeout=60).json()
    choices = sorted(out["choices"], key=lambda ch: ch["index"])
    assert [ch["index"] for ch in choices] == [0, 1]
    for ch, cont in zip(choices, conts):
        ids = ctx + cont
        got = ch["logprobs"]["token_logprobs"][len(ctx):-1]
        ref = hf_logprobs(ids)
        _worst("echo", got, ref[np.arange(len(ctx) - 1, len(ids) - 1), cont])
        for t, top in zip(got, ch["logprobs"]["top_logprobs"][len(ctx):-1]):
            assert isinstance(top, dict) and len(top) in (1, 2)
    assert out["usage"]["prompt_tokens"] == sum(len(ctx + c) for c in conts)


def test_chat_logprobs_stream_and_not(srv, hf_logprobs):
    client, tok = srv["client"], srv["tok"]
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    r = client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in content)
    prompt = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    gen = _ids([e.token for e in client.chat.completions.create(
        model="demo", messages=msgs, max_completion_tokens=6, temperature=0, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.content])
    ref = hf_logprobs(prompt + gen)
    _worst("generation", [e.logprob for e in content],
           ref[np.arange(len(prompt) - 1, len(prompt) - 1 + len(gen)), gen])
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_n_choices_and_batched_prompts(srv):
    client = srv["client"]
    kw = dict(model="demo", prompt="class Stack:", max_tokens=12, temperature=1.0, seed=7)
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) > 1
    assert r.usage.prompt_tokens == len(srv["tok"]("class Stack:")["input_ids"])
    assert [c.text for c in client.completions.create(n=3, best_of=3, **kw).choices] == [c.text for c in r.choices]
    assert client.completions.create(**kw).choices[0].text == r.choices[0].text  # choice 0 = the n = 1 answer
    streamed = {}
    for ch in client.completions.create(n=2, stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: r.choices[0].text, 1: r.choices[1].text}
    prompts = ["def fibonacci(n):", "import os\n"]
    batch = _greedy(client, prompt=prompts, n=2, max_tokens=8)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    alone = [_greedy(client, prompt=p, max_tokens=8).choices[0].text for p in prompts]
    assert [c.text for c in batch.choices] == [alone[0], alone[0], alone[1], alone[1]]
    more = _greedy(client, prompt=prompts[0], n=6, max_tokens=8)  # more choices than slots: they queue
    assert [c.text for c in more.choices] == [alone[0]] * 6 and more.usage.completion_tokens == 6 * 8


def test_penalties_bias_and_sampling_fields(srv):
    """Each field changes the output the way it says (vLLM's fields through extra_body)."""
    import quasar_jax as qj
    from quasar_jax.speculative.sampling import SamplingParams

    client, tok = srv["client"], srv["tok"]
    base = _greedy(client, prompt=PROMPT, max_tokens=24).choices[0].text
    pen = dict(presence_penalty=0.8, frequency_penalty=0.5)
    got = _greedy(client, prompt=PROMPT, max_tokens=24, extra_body={"repetition_penalty": 1.3}, **pen).choices[0]
    assert got.text != base
    engine = qj.Engine(srv["model"])  # the offline engine with the same settings gives the same tokens
    want = engine.generate([tok(PROMPT)["input_ids"]], qj.GenerationConfig(
        max_new_tokens=24, drafter="ngram", num_draft=3, stop_ids=srv["stop_ids"], max_len=192),
        sampling=[SamplingParams(repetition_penalty=1.3, **pen)]).tokens[0]
    assert got.text == tok.decode(want, skip_special_tokens=True)
    x = tok(" x")["input_ids"][0]
    biased = _greedy(client, prompt=PROMPT, max_tokens=5, logit_bias={str(x): 100})
    assert biased.choices[0].text == " x" * 5
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # sampling that can keep only the argmax
        same = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3,
                                         extra_body=extra)
        assert same.choices[0].text == base


def test_eos_fields_min_tokens_and_stop_token_ids(srv):
    client, eos = srv["client"], srv["stop_ids"][0]
    force_eos = {str(eos): 100}
    r = _greedy(client, prompt=PROMPT, max_tokens=6, logit_bias=force_eos)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = _greedy(client, prompt=PROMPT, max_tokens=6, logit_bias=force_eos, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    r = _greedy(client, prompt=PROMPT, max_tokens=6, logit_bias=force_eos, extra_body={"min_tokens": 3})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"
    r = _greedy(client, prompt=PROMPT, max_tokens=3, logit_bias=force_eos,
                extra_body={"ignore_eos": True, "skip_special_tokens": False, "spaces_between_special_tokens": False})
    assert r.choices[0].text == srv["tok"].decode([eos]) * 3
    text = _greedy(client, prompt=PROMPT, max_tokens=24).choices[0]
    gen = _ids(_greedy(client, prompt=PROMPT, max_tokens=24, logprobs=0,
                       extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.tokens)
    stop_id = gen[3]
    r = _greedy(client, prompt=PROMPT, max_tokens=24, extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == gen.index(stop_id) + 1
    stop = text.text.strip()[4:7]
    kept = _greedy(client, prompt=PROMPT, max_tokens=24, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text.text[:text.text.index(stop) + len(stop)]


def test_usage_stats_tokens_as_ids_and_truncation(srv):
    client, tok = srv["client"], srv["tok"]
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    tokens = [c.usage.completion_tokens for c in chunks if c.choices]
    assert tokens == sorted(tokens) and chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    r = _greedy(client, prompt=PROMPT, max_tokens=3, logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert all(t.startswith("token_id:") for t in r.choices[0].logprobs.tokens)
    long = "import os\nimport sys\n" * 3 + PROMPT
    cut = _greedy(client, prompt=long, max_tokens=8,
                  extra_body={"truncate_prompt_tokens": len(tok(PROMPT)["input_ids"])})
    assert cut.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert cut.choices[0].text == _greedy(client, prompt=PROMPT, max_tokens=8).choices[0].text
    msgs = [{"role": "user", "content": "hi", "name": "ann"}]
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4, temperature=0, user="me",
                                       extra_body={"chat_template_kwargs": {}, "add_generation_prompt": True})
    bare = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4, temperature=0,
                                          extra_body={"add_generation_prompt": False})
    assert r.usage.completion_tokens <= 4 and bare.usage.prompt_tokens < r.usage.prompt_tokens
    # "developer" (what current OpenAI SDK examples send) is the system turn under another name
    turns = [{"role": "developer", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    dev = client.chat.completions.create(model="demo", messages=turns, max_tokens=6, temperature=0)
    sys_ = client.chat.completions.create(model="demo", messages=[dict(turns[0], role="system"), turns[1]],
                                          max_tokens=6, temperature=0)
    assert dev.usage.prompt_tokens == sys_.usage.prompt_tokens > bare.usage.prompt_tokens
    assert dev.choices[0].message.content == sys_.choices[0].message.content
    raw = _greedy(client, prompt=PROMPT, max_tokens=2, extra_body={"add_special_tokens": False})
    assert raw.usage.prompt_tokens == len(tok(PROMPT, add_special_tokens=False)["input_ids"])


def test_vllm_benchmark_request_bodies(srv):
    """What `vllm bench serve` sends (completions and chat), byte for byte in shape."""
    url = srv["url"]
    body = {"model": "demo", "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 12, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
    usage = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                usage = data.get("usage") or usage
    assert usage["completion_tokens"] == 12
    chat = {"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat, timeout=60) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert lines[-1]["usage"]["completion_tokens"] == 5


MULTIBYTE = "中文文本：你好，世界！😀 naïve"  # the demo's byte-level BPE splits every CJK character


def _raw(token: str) -> bytes:
    """A logprob token's bytes: ``bytes:\\xNN...`` or its UTF-8."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode("utf-8")


def test_logprob_tokens_are_the_tokens_own_bytes(srv):
    """Tokens that are not whole UTF-8 are shown as ``bytes:\\xNN`` of their own bytes, so the
    tokens of an echoed prompt spell its bytes exactly and ``top_logprobs`` never merges two ids."""
    client, tok = srv["client"], srv["tok"]
    ids = tok(MULTIBYTE)["input_ids"]
    kw = dict(prompt=MULTIBYTE, max_tokens=2, echo=True, logprobs=3)
    lp = _greedy(client, **kw).choices[0].logprobs
    by_id = _greedy(client, **kw, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert b"".join(_raw(t) for t in lp.tokens[:len(ids)]) == MULTIBYTE.encode("utf-8")
    assert sum(t.startswith("bytes:") for t in lp.tokens) >= 20
    assert _ids(by_id.tokens)[:len(ids)] == ids
    for j in range(1, len(lp.tokens)):
        top, top_ids = lp.top_logprobs[j], by_id.top_logprobs[j]
        assert len(top) == len(top_ids) >= 3  # distinct ids, distinct keys (+ the token when outside the top 3)
        assert sorted(top.values()) == pytest.approx(sorted(top_ids.values()))
        assert top[lp.tokens[j]] == pytest.approx(lp.token_logprobs[j])
    offsets = lp.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert offsets[len(ids) - 1] < len(MULTIBYTE) <= offsets[len(ids)]  # a split character starts at its first token


def test_chat_logprob_bytes_are_the_tokens_bytes(srv):
    from quasar_jax.serving.responses import TokenPieces

    client, tok = srv["client"], srv["tok"]
    pieces = TokenPieces(tok)
    ids = tok(MULTIBYTE)["input_ids"]
    assert b"".join(pieces.bytes(i) for i in ids) == MULTIBYTE.encode("utf-8")
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": MULTIBYTE}], max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes) == _raw(t.token)
