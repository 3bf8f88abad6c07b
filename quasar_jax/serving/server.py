"""Assembling a server: slots (on a mesh or one device), speculation policy, scheduler, app;
uvicorn in the foreground or a thread."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import threading
import time

import jax
import uvicorn
from flax import nnx

from quasar_jax.model.modes import QuantMode
from quasar_jax.model.paged_kv_cache import CacheSpec, KVLayout, cache_bytes_per_token
from quasar_jax.serving.api import Api, create_app
from quasar_jax.sharding.plan import device_memory_bytes
from quasar_jax.serving.paged_scheduler import PagedScheduler
from quasar_jax.serving.scheduler import Scheduler
from quasar_jax.serving.slots import SlotEngine
from quasar_jax.serving.speculation import AUTO, draft_options, make_policy, parse_speculation
from quasar_jax.speculative.drafters import Drafter, QSpecDrafter


DENSE_MAX_LEN = 4096  # the dense layout's default max_len, and the default pool's tokens per slot


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything static about one server (changing any of it means new programs)."""

    drafter: Drafter
    verifier: QuantMode = QuantMode.FLOAT
    slots: int = 16
    # Positions per request (prompt + completion). None: the model's context (max_position_embeddings),
    # at most DENSE_MAX_LEN on the dense layout (a strip of max_len per slot); past the context only
    # with allow_long_context.
    max_len: int | None = None
    allow_long_context: bool = False
    chunk_steps: int = 8  # N: verify steps per device call at most
    prefill_chunk: int = 128  # largest prefill piece
    prefill_budget: int | None = None  # prompt tokens per iteration while rows decode (None: prefill_chunk; 0: none)
    max_queue: int = 64  # requests (a batch of prompts is one) waiting for slots before 429
    max_request_bytes: int = 64 << 20  # request bodies past this get 413
    num_stop: int = 4
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    speculation: str | int = AUTO  # auto | off (0) | K: the chunk programs (serving.speculation)
    mesh: object = None  # None (one device), "data=D,model=M", a MeshSpec or a jax Mesh
    # The KV cache: paged (one pool, its KV heads on model on a mesh) or dense (a [max_len] strip per slot).
    kv_layout: str | None = None  # None: paged on one device, dense on a mesh
    page_size: int = 16
    kv_pages: int | None = None  # None: from kv_memory_fraction, else the dense cache's memory
    kv_memory_fraction: float | None = None  # of the device memory left after the weights
    kv_dtype: str = "auto"
    prefix_caching: bool = True

    def __post_init__(self):
        object.__setattr__(self, "verifier", QuantMode.parse(self.verifier, "verifier"))
        object.__setattr__(self, "speculation", parse_speculation(self.speculation))
        if isinstance(self.drafter, QSpecDrafter) and self.verifier is not QuantMode.W8A16:
            raise ValueError("drafter 'qspec' drafts with w8a8 and verifies with w8a16: use verifier 'w8a16'")
        for name in ("slots", "chunk_steps", "prefill_chunk", "max_queue", "num_stop", "default_max_tokens",
                     "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.prefill_budget is not None and self.prefill_budget < 0:
            raise ValueError(f"prefill_budget must be >= 0 (0: no budget), got {self.prefill_budget}")
        layout = self.kv_layout or (KVLayout.DENSE if self.mesh is not None else KVLayout.PAGED)
        CacheSpec(layout, self.page_size, self.kv_dtype)  # validates
        object.__setattr__(self, "kv_layout", KVLayout(layout))
        if self.kv_pages is not None and self.kv_pages < 1:
            raise ValueError(f"kv_pages must be >= 1, got {self.kv_pages}")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    @property
    def cache_spec(self) -> CacheSpec:
        return CacheSpec(self.kv_layout, self.page_size, self.kv_dtype)

    def for_model(self, config) -> "ServeConfig":
        """``max_len`` resolved against the model's context (``ValueError`` past it unless
        ``allow_long_context``)."""
        context = config.max_position_embeddings
        if self.max_len is None:
            dense = self.kv_layout is KVLayout.DENSE
            return dataclasses.replace(self, max_len=min(context, DENSE_MAX_LEN) if dense else context)
        if self.max_len > context and not self.allow_long_context:
            raise ValueError(f"max_len {self.max_len} is past the model's context of {context} positions "
                             "(max_position_embeddings): lower it, or allow it explicitly (allow_long_context)")
        return self

    def num_kv_pages(self, model) -> int:
        """Pages of the pool: ``kv_pages``, else ``kv_memory_fraction`` of the device memory left
        after the weights, else as many as a dense cache of ``slots x min(max_len, DENSE_MAX_LEN)``
        would hold."""
        if self.kv_pages is not None:
            return self.kv_pages
        if self.kv_memory_fraction is None:
            return self.slots * -(-min(self.max_len, DENSE_MAX_LEN) // self.page_size)
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
        per_page = self.page_size * cache_bytes_per_token(model.config, self.kv_dtype, model.dtype)
        device = device_memory_bytes()
        pages = int((device - weights) * self.kv_memory_fraction) // per_page
        if pages < 1:
            raise ValueError(f"kv_memory_fraction {self.kv_memory_fraction}: {device / 2**30:.2f} GiB of device memory "
                             f"less {weights / 2**30:.2f} GiB of weights leaves no KV page of {per_page} bytes")
        return pages

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({min(b, self.prefill_chunk) for b in (32, 64)} | {self.prefill_chunk}))


    def for_stop_ids(self, stop_ids: tuple[int, ...]) -> "ServeConfig":
        """Room for the model's stop ids."""
        return dataclasses.replace(self, num_stop=max(self.num_stop, len(stop_ids)))


def make_engine(model, cfg: ServeConfig) -> SlotEngine:
    """The slots and every program (one chunk program per speculation option), compiled."""
    cfg = cfg.for_model(model.config)
    return SlotEngine(model, draft_options(cfg.drafter, cfg.speculation), cfg.verifier, slots=cfg.slots,
                      max_len=cfg.max_len, num_stop=cfg.num_stop, chunk_steps=cfg.chunk_steps,
                      prefill_buckets=cfg.prefill_buckets, mesh=cfg.mesh, cache_spec=cfg.cache_spec,
                      kv_pages=cfg.num_kv_pages(model) if cfg.kv_layout is KVLayout.PAGED else None)


def build(model, tokenizer, cfg: ServeConfig, *, model_name: str, stop_ids: tuple[int, ...], engine=None,
          on_fatal=None):
    """``(app, api, scheduler)`` with the scheduler thread started; every program compiled and, for
    ``--speculation auto``, timed (``speculation.calibrate``). ``engine``: slots already built
    (``make_engine``; on process 0 of a group, wrapped in ``lockstep.Leader``)."""
    cfg = cfg.for_stop_ids(stop_ids).for_model(model.config)
    engine = engine if engine is not None else make_engine(model, cfg)
    paged = {"prefix_caching": cfg.prefix_caching} if getattr(engine, "paged", False) else None
    scheduler = (PagedScheduler if paged else Scheduler)(
        engine, max_queue=cfg.max_queue,
        prefill_budget=cfg.prefill_chunk if cfg.prefill_budget is None else cfg.prefill_budget,
        policy=make_policy(engine, cfg.speculation),
        on_fatal=on_fatal, **(paged or {})).start()
    api = Api(scheduler, tokenizer, model_name=model_name, stop_ids=stop_ids,
              default_max_tokens=cfg.default_max_tokens, max_len=cfg.max_len,
              max_request_bytes=cfg.max_request_bytes)
    app = create_app(api, on_shutdown=scheduler.stop)
    return app, api, scheduler


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM / SIGINT end with exit status 0 after the drain (uvicorn re-raises the
    signal once shut down, which makes the process die of it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve_forever(app, host: str, port: int, drain_timeout: float | None = None) -> None:
    """Run ``app`` until SIGTERM / SIGINT; in-flight requests finish first (up to ``drain_timeout``)."""
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                  timeout_graceful_shutdown=drain_timeout)).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread (tests, the load generator's offline mode)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                   lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
