import os

# 8 simulated CPU devices for sharding tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Fixture generators (they need torch and peft and write files) are scripts, not tests.
collect_ignore_glob = ["fixtures/*"]
