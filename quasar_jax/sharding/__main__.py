"""``python -m quasar_jax.sharding``: the per-device memory plan (``quasar_jax.sharding.plan``)."""

from quasar_jax.sharding.plan import main

raise SystemExit(main())
