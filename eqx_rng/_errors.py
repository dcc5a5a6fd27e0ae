"""Errors raised by `eqx_rng.vmap` (vectorisation)."""


class BroadcastKeyError(ValueError):
    """A key shared by every mapped call is drawn from, so every call draws the same.

    Raised by `eqx_rng.vmap` at trace time when an argument that is not mapped
    (`in_axes` `None`) holds a PRNG key and the function draws from it or splits it
    (`jax.random.normal`, `jax.random.split`, ...) without first folding in anything
    that differs from one mapped call to the next. Every row of the batch would then
    get the same noise. The message names the argument (and the path inside it) and
    the fixes:

    - pass the key as `key=`: `eqx_rng.vmap` derives one key per call,
      `derive(key, i)`;
    - fold per-call data into it first, `jr.fold_in(key, lax.axis_index(name))` or a
      mapped example id (that raises nothing);
    - `keys="broadcast"` to share one key on purpose.

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
