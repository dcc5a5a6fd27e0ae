"""The one use of JAX's private API in `eqx_rng.vmap`, isolated here.

`eqx_rng.vmap` must tell, at trace time, whether an output that the user asked to
return unmapped (`out_axes` None) actually carries the batch axis, so that it can
name the output (and the State inside it) in its error. JAX has no public way to
ask a tracer "are you batched by the vmap being traced right now?", so this module
reads `jax._src.core.trace_ctx` and `jax._src.interpreters.batching`.

If JAX changes these internals, `is_batched` returns None (unknown) and
`eqx_rng.vmap` falls back to converting JAX's own error message, which names no
path. `internals_available()` is asserted by a test, so such a change fails loudly
in this project's test suite instead of silently degrading the messages.
"""

from typing import Any


def _modules() -> tuple[Any, Any] | None:
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import batching
    except ImportError:
        return None
    if not hasattr(jax_core, "trace_ctx") or not hasattr(batching, "BatchTrace"):
        return None
    return jax_core, batching


def internals_available() -> bool:
    """Whether the private JAX names that `is_batched` reads exist."""
    mods = _modules()
    if mods is None:
        return False
    jax_core, batching = mods
    return hasattr(jax_core.trace_ctx, "trace") and hasattr(batching, "BatchTracer")


def is_batched(x: Any) -> bool | None:
    """Whether `x` carries the batch axis of the vmap being traced right now.

    Returns None (unknown) when JAX's internals are not as expected, or when no
    vmap is being traced.
    """
    mods = _modules()
    if mods is None:
        return None
    jax_core, batching = mods
    trace = getattr(jax_core.trace_ctx, "trace", None)
    if not isinstance(trace, batching.BatchTrace):
        return None
    return (
        isinstance(x, batching.BatchTracer)
        and getattr(x, "_trace", None) is trace
        and getattr(x, "batch_dim", None) is not None
    )


__all__ = ["internals_available", "is_batched"]
