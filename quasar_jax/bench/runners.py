"""Runners: one callable per mode that generates a batch of prompts and times it.

A runner maps a list of prompt ids to ``(new token ids per prompt, steps per prompt, timed wall
seconds)``. :class:`JaxRunner` drives one ``Engine``; :class:`HFRunner` drives transformers
``generate`` one prompt at a time (torch and the transformers model classes are imported only
when an HF mode runs).
"""

from __future__ import annotations

import time
from typing import Sequence

from quasar_jax.bench.modes import ModeSpec
from quasar_jax.speculative.buckets import round_up
from quasar_jax.speculative.engine import Engine, GenerationConfig


# ----------------------------------------------------------------------------- JAX
def jax_generation_config(args, spec: ModeSpec, stop_ids: Sequence[int], max_len: int,
                          heads=None) -> GenerationConfig:
    """The mode's config; S4C modes use ``heads`` with their stored tree size and one n-gram
    candidate joining it (the drafter's defaults)."""
    s4c = spec.drafter == "s4c"
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, drafter=spec.drafter, num_draft=args.num_draft,
        ngram_min=args.ngram_min, ngram_max=args.ngram_max, ngram_prefer=args.ngram_prefer,
        verifier=spec.verifier, num_candidates=args.num_candidates if spec.tree else 1,
        tree_nodes=args.tree_nodes if spec.tree else None, heads=heads if s4c else None,
        temperature=args.temperature, stop_ids=tuple(stop_ids), max_len=max_len,
        seed=args.seed, kv_dtype=getattr(args, "kv_dtype", "auto"))


def shape_key(prompt_ids: Sequence[Sequence[int]], rows: Sequence[int], bucket: int) -> tuple:
    """(batch rows, padded prompt length): one compiled program per key."""
    longest = max(len(prompt_ids[i]) for i in rows)
    return len(rows), round_up(longest, bucket)


class JaxRunner:
    """``Engine.generate``; its compile time is summed in ``compile_s`` and left out of the wall."""

    def __init__(self, spec: ModeSpec, engine: Engine, config: GenerationConfig):
        self.spec, self.engine, self.config = spec, engine, config
        self.compile_s = 0.0

    def __call__(self, prompts: list[list[int]]):
        t0 = time.perf_counter()
        res = self.engine.generate(prompts, self.config)
        wall = time.perf_counter() - t0
        compile_s = res.batch_stats.compile_s
        self.compile_s += compile_s
        return res.tokens, [s.verify_steps for s in res.stats], wall - compile_s


# ----------------------------------------------------------------------------- HF peers
class HFRunner:
    """transformers ``generate`` one prompt at a time; forward calls are counted with a hook."""

    def __init__(self, spec: ModeSpec, model, gen_config):
        self.spec, self.model, self.gen_config = spec, model, gen_config
        self.compile_s = None
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def __call__(self, prompts: list[list[int]]):
        import torch

        tokens, steps, wall = [], [], 0.0
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.long)
            before = self.calls
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                          generation_config=self.gen_config)
            wall += time.perf_counter() - t0
            tokens.append(out[0, len(p):].tolist())
            steps.append(self.calls - before)
        return tokens, steps, wall


def hf_generation_config(args, spec: ModeSpec, stop_ids: Sequence[int], pad_id: int):
    from transformers import GenerationConfig as HFGenerationConfig

    kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=list(stop_ids) or None,
              pad_token_id=pad_id, num_beams=1)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_k=None, top_p=None)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if spec.drafter == "pld":
        kw.update(prompt_lookup_num_tokens=args.num_draft, max_matching_ngram_size=args.ngram_max)
    return HFGenerationConfig(**kw)


def load_hf_model(model_dir, seed: int):
    """The torch float32 peer model (eval mode), with torch's global seed set to ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # generate() falls back to the model's own generation config for unset fields (eos!): the
    # benchmark's GenerationConfig must be the only source, so neutralise the model's one.
    model.generation_config.eos_token_id = None
    torch.manual_seed(seed)
    return model
