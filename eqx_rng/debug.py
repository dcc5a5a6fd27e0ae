"""Debugging helpers: `key_reuse()` turns on JAX's key-reuse checker and refuses
legacy keys; `doctor()` records versions, devices and PRNG settings."""

from ._debug import doctor as doctor, key_reuse as key_reuse
