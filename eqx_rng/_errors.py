"""Errors raised by `eqx_rng.vmap` (vectorisation)."""


class BroadcastKeyError(ValueError):
    """A key that is the same in every mapped call is drawn from: every call would
    draw the same numbers.

    Raised by `eqx_rng.vmap` at trace time when the function *draws* bits
    (`jax.random.normal`, `bernoulli`, ...) from a key that carries nothing per call:
    an argument that is not mapped (`in_axes` `None`), a key field of the function
    itself (a Module), a key closed over by the function, or a key made inside it
    from a fixed seed, with no per-call data folded in on the way. Splitting is not
    drawing: the keys a split makes inherit their parent's marks, so
    `jr.split(key, n)[i]` with a mapped `i` raises nothing. The message names the
    key (the argument and the path inside it, or "the key `k` closed over by
    `fn`"), the primitive that draws, and the fixes:

    - pass the key as `key=`: `eqx_rng.vmap` derives one key per call,
      `derive(key, i)`;
    - fold per-call data into it first, `jr.fold_in(key, lax.axis_index(name))` or a
      mapped example id (that raises nothing);
    - wrap the argument in `eqx_rng.shared(...)` when every call should draw the
      same numbers on purpose (`keys="broadcast"` turns the check off and also
      shares `key=`).

    A subclass of `ValueError`.

    !!! Example

        ```python
        def add_noise(x, key):
            return x + jr.normal(key, x.shape)

        xs = jnp.zeros((4, 3))
        try:
            eqx_rng.vmap(add_noise, in_axes=(0, None))(xs, jr.key(0))
        except eqx_rng.BroadcastKeyError as e:
            assert "argument 'key'" in str(e)
        ```
    """


__all__ = ["BroadcastKeyError"]
