"""Several simulated CPU devices for the sharding tests; must run before `import jax`."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
