"""``python -m quasar_jax.fidelity``."""

from quasar_jax.fidelity.cli import main

raise SystemExit(main())
