"""Spec-Bench-style benchmark: acceptance (tau), speedup, exact match, float-vs-int8 fidelity.

    python -m quasar_jax.bench --model demo --questions ../shared/specbench/*.jsonl \\
        --num-prompts 3 --max-new-tokens 64 --out runs/bench

Every mode runs on the same prompt ids in one process; results go to ``DIR/results.json``,
``DIR/results.md``, ``DIR/plot.png`` and ``DIR/outputs.jsonl`` (generated ids and text per
prompt and mode).

Modes (``--modes``, comma separated):

===============  ==========================================================================
``ar-fp``        autoregressive (drafter none), float model: the speed baseline
``ar-int8``      autoregressive, int8 model, W8A16 (weight-only) matmuls
``ar-w8a8``      autoregressive, int8 model, W8A8 matmuls (the exact-match reference of
                 ``quasar-w8a8``; added automatically when that mode is requested)
``sd-fp``        n-gram prompt-lookup drafting + float verifier
``quasar-w8a16`` n-gram drafting + int8 W8A16 verifier (Quasar)
``quasar-w8a8``  n-gram drafting + int8 W8A8 verifier
``qspec``        W8A8 drafting + W8A16 verifying of the same int8 weights (QSpec)
``tree-fp``      C n-gram candidates (``--num-candidates``, default 4) verified as one token tree,
                 float verifier
``tree-w8a16``   the same with the int8 W8A16 verifier (Quasar with tree drafts)
``s4c-fp``       S4C: trained draft heads (``--heads``, default: beside the model) grow a token
                 tree, one n-gram candidate joins it, float verifier (docs/s4c.md)
``s4c-w8a16``    the same with the int8 W8A16 verifier (Quasar + S4C)
``hf-ar``        transformers ``generate`` greedy, torch float32 on CPU, batch 1
``hf-pld``       transformers ``generate(prompt_lookup_num_tokens=K)`` (prompt lookup decoding)
===============  ==========================================================================

``ar-fp`` is always run (it is the speed and fidelity baseline); ``ar-int8`` is added when
``quasar-w8a16``, ``qspec``, ``tree-w8a16`` or ``s4c-w8a16`` is requested and ``ar-w8a8`` when ``quasar-w8a8`` is: runs added that
way carry ``"auto_added": true``. The float model is loaded once; the int8 model is loaded once
with int8 weights (quantised while loading, as ``decode`` and ``fidelity`` do; the activation mode
is chosen per call) and shared by every int8 mode. One ``Engine`` per model: each (mode, batch,
prompt bucket) program compiles once, ahead of time; its compile time is reported as ``compile_s``
(summed over the shape buckets of the mode) and never counted in the timed wall.
``--prompt-bucket N`` pads prompts to a multiple of N tokens instead of the engine's 32 (fewer
programs to compile, a little more prefill; every JAX mode pads alike). Before timing, every (mode,
shape bucket) gets one untimed warm-up generate. Then ``--repeats`` timed rounds run every mode
over every batch (modes interleaved round by round, so slow drift of a shared machine hits all
modes alike); each batch's wall time is the median over the rounds.

Prompts: Spec-Bench jsonl rows ``{"question_id", "category", "turns"}``; the first turn is the
prompt, a missing or empty category is replaced by the file's stem (``alpaca.jsonl`` ->
``alpaca``). ``--num-prompts N`` keeps the first N prompts *of each category* (in the order of the
files given, then of the lines); a prompt text seen before (the same question in two files) is
used once. Batches (``--batch-size``) never mix categories. HF modes always run batch 1.

Counting, identical for every mode: a prompt's output is its new token ids (the prompt excluded),
cut after the first stop id (included when emitted) and at ``--max-new-tokens``. Metrics per mode,
per category and overall (pooled over prompts, not averaged over per-prompt ratios):

* ``tau`` = new tokens / verify steps (each step emits the accepted drafts plus the bonus token;
  1.0 for autoregressive decoding). For ``qspec`` only verify passes count: its K single-token
  W8A8 draft forwards per step are extra work that ``tau`` does not show (tokens/s does). For HF
  modes the steps are the model's forward calls counted with a forward hook (the first one is the
  prefill, which emits the first token, like our first verify step), so ``tau`` is 1.0 for
  ``hf-ar`` and the mean tokens per forward for ``hf-pld``.
* ``tokens_per_s`` = new tokens / timed wall; the wall of a batch is the whole
  ``Engine.generate`` (or ``model.generate``) call, median over the repeats.
* ``speedup_vs_ar_fp`` = ``tokens_per_s`` / ``tokens_per_s`` of ``ar-fp`` on the same prompts.
* ``exact_match`` = fraction of prompts whose output ids equal those of the mode's lossless
  reference (``reference``): ``ar-fp`` for ``sd-fp``, ``hf-ar``, ``hf-pld`` (and itself);
  ``ar-int8`` for ``quasar-w8a16`` and ``qspec`` (both verify with W8A16); ``ar-w8a8`` for
  ``quasar-w8a8``. Under greedy decoding speculative modes must score 1.0; a lower value means
  a numerical difference between the K+1-token verify pass and single-token decoding (or, for
  HF modes, between torch and XLA). ``exact_match_vs_ar_fp`` compares every mode with ``ar-fp``
  (for int8 modes that is the quantisation drift, not a correctness check).
* ``fidelity`` (per activation mode w8a16 / w8a8, see :func:`quasar_jax.fidelity.fidelity`): along
  the ``ar-fp`` greedy outputs, teacher-forced, the top-1 agreement of int8 vs float next-token
  predictions, the mean KL(p_fp || p_int8) per position, and the mean common prefix (in tokens)
  of the int8 autoregressive output and the ``ar-fp`` output.

* ``step_cost`` (per drafting mode, :mod:`~quasar_jax.bench.step_cost`; ``--no-step-cost`` and
  ``--mesh`` skip it): the mode's draft and its verify forward over 1 and T tokens, each compiled alone at the
  run's batch and cache; ``r`` = draft / verify(1 token) (speed-up = tau / (1 + r) where a verify
  is flat in its token count, as on an accelerator), ``r_step`` = draft / verify(T) (the draft's
  share of a step here) and ``r_bytes`` = weights the draft reads / weights a verify reads.

Modules, one job each: :mod:`~quasar_jax.bench.modes` (the mode table), :mod:`~.runners` (JAX
and HF runners; the one place that touches the engine / loader API), :mod:`~.metrics` (counting
and pooled metrics), :mod:`~.step_cost` (r per mode), :mod:`~.run` (orchestration), :mod:`~.report` (machine info, JSON, markdown,
plot), :mod:`~.cli` (``python -m quasar_jax.bench``).
"""
