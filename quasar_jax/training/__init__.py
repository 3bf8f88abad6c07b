"""Training S4C draft heads by self-distillation: ``trainer`` (data, optimiser, orbax checkpoints,
acceptance measurement) and ``corpus`` (the demo model's text). ``python -m quasar_jax.train_heads``
is its command line.
"""
