"""Session-wide test hygiene."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_executables():
    """Drop JAX's compiled executables after each test module.

    Every XLA CPU executable holds ~100 memory mappings until it is collected; the whole suite
    compiles thousands, which exceeds Linux's default vm.max_map_count (65530) and makes a
    later compile segfault. Clearing per module keeps the count bounded.
    """
    yield
    jax.clear_caches()
    gc.collect()
