"""What the commands share, host-side and without JAX at import: ``runner`` (one-line errors, exit
statuses, Ctrl-C), ``flags`` (the shared flags and value parsers), ``mesh_flags`` (mesh specs and
the multi-host flags), ``errors`` (``InputError``), ``outputs`` (output paths checked, written all
or nothing), ``prompts`` and ``examples`` (prompt files, Spec-Bench questions, the shipped prompt
set), ``text_stream`` (incremental detokenization, stop strings) and ``compile_cache`` (JAX's
persistent compilation cache; the one module here that imports JAX).

It is the bottom floor beside ``pallas_kernels``: it imports nothing else of ``quasar_jax``, so
every layer may use it.
"""
