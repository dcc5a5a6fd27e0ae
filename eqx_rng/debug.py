"""Debugging helpers: `key_reuse()` turns on JAX's key-reuse checker (reuse by
derivation included) and refuses legacy keys; `check_distinct_keys()` refuses the same
key in two chains; `doctor()` records versions, devices, the CPU and PRNG settings."""

from ._debug import doctor as doctor, key_reuse as key_reuse
from ._derive_reuse import DerivedKeyReuseError as DerivedKeyReuseError
from ._distinct import check_distinct_keys as check_distinct_keys
