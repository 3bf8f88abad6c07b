"""``python -m quasar_jax.bench``: see :mod:`quasar_jax.bench.cli`."""

from quasar_jax.bench.cli import main

raise SystemExit(main())
