"""``python -m quasar_jax``: the list of commands."""

from __future__ import annotations

COMMANDS = [
    ("decode", "generate text: n-gram or S4C speculative decoding, Quasar (int8 verifier), QSpec, or plain AR"),
    ("convert", "convert a checkpoint once (optionally to int8) into a fast-loading directory"),
    ("bench", "Spec-Bench style benchmark of every mode side by side (tokens/s, tau, exactness)"),
    ("fidelity", "how closely the int8 verifier tracks the float model (top-1, KL, common prefix)"),
    ("train_heads", "train S4C draft heads on the model's own generations (self-distillation)"),
    ("serve", "OpenAI-compatible HTTP server with continuous batching"),
]


def main() -> int:
    print("quasar_jax: quantized self-speculative decoding for Qwen3 in JAX.\n")
    print("usage: python -m quasar_jax.<command> [--help]\n\ncommands:")
    for name, what in COMMANDS:
        print(f"  {name:<10} {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
