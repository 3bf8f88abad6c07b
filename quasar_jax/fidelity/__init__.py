"""Float-vs-int8 fidelity: how closely the int8 verifier (Quasar / QSpec) tracks the float model.

``python -m quasar_jax.fidelity --model demo --questions ../shared/specbench/*.jsonl --num-prompts 5``

For each int8 mode (w8a16, w8a8), over a prompt set, against the float model:

* top-1 agreement and mean KL(p_fp || p_q) of next-token distributions, along the float model's
  greedy trajectories (one teacher-forced forward per prompt through both models);
* mean length of the common prefix of the int8 model's greedy output and the float one's;
* tau (tokens per verify step) of Quasar (n-gram + int8 verifier) next to tau of n-gram + float
  verifier on the same prompts.

Modules: ``metrics`` (the measurements; ``quasar_jax.bench`` reuses them), ``cli`` (flags, the
run, the table and ``--json``). This package never imports the benchmark.
"""
