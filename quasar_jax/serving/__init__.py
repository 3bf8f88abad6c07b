"""Continuous-batching server: slots on device (``slots``), the host scheduler (``scheduler``),
the OpenAI-compatible HTTP API (``api``), metrics, and assembly (``server``). CLI:
``python -m quasar_jax.serve``; see docs/serving.md."""
