"""The server on a mixture of experts: ``demo-moe`` served with continuous batching and
``--speculation auto`` answers greedy float32 requests with offline autoregressive decoding's tokens.

One small server (2 slots, short cache); the three requests are more than the slots, so one waits
and is admitted as another leaves.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

openai = pytest.importorskip("openai")

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "for i in range(10):"]
MAX_TOKENS = [12, 9, 14]
MAX_LEN = 96


@pytest.fixture(scope="module")
def moe_server():
    import quasar_jax as qj
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.serving.server import ServeConfig, ServerThread, build
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.weights.loading import resolve_model_dir

    model, tok = qj.load("demo-moe", dtype="float32")
    stop_ids = stop_ids_of(tok, resolve_model_dir("demo-moe"))
    cfg = ServeConfig(drafter=make_drafter("ngram", num_draft=2), slots=2, max_len=MAX_LEN, chunk_steps=4,
                      prefill_chunk=16, max_queue=8, speculation="auto")
    app, api, scheduler = build(model, tok, cfg, model_name="demo-moe", stop_ids=stop_ids)
    server = ServerThread(app).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield dict(model=model, tok=tok, client=client, scheduler=scheduler, stop_ids=stop_ids)
    server.stop()


def test_served_moe_greedy_equals_offline_autoregressive(moe_server):
    import quasar_jax as qj
    from quasar_jax.serving.speculation import AdaptivePolicy

    tok, client, scheduler = moe_server["tok"], moe_server["client"], moe_server["scheduler"]
    policy = scheduler.policy
    # --speculation auto: one chunk program per K in {0, 2}, each calibrated (timed) at start-up
    assert isinstance(policy, AdaptivePolicy)
    assert policy.ks == [0, 2] and len(policy.calibration) == 2
    assert all(t1 > 0 and tb > 0 for t1, tb in policy.calibration)

    def one(i):
        kw = dict(model="demo-moe", prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0)
        if i == 1:
            chunks = list(client.completions.create(stream=True, **kw))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].usage.completion_tokens
        r = client.completions.create(**kw)
        return r.choices[0].text, r.usage.completion_tokens

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    engine = qj.Engine(moe_server["model"])
    for i, prompt in enumerate(PROMPTS):
        cfg = qj.GenerationConfig(max_new_tokens=MAX_TOKENS[i], drafter="none", stop_ids=moe_server["stop_ids"],
                                  max_len=MAX_LEN)
        want = engine.generate([tok(prompt)["input_ids"]], cfg).tokens[0]
        assert got[i] == (tok.decode(want, skip_special_tokens=True), len(want)), i
