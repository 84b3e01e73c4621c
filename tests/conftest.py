"""Several simulated CPU devices for the sharding tests; must run before `import jax`."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compilation():
    """Tiny graphs compile faster than XLA's optimisation passes save; opt in per module with
    `pytestmark = pytest.mark.usefixtures("fast_compilation")`."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
