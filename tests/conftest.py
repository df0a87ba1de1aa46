import os
import tempfile

# Tests run on CPU in fp32; keep XLA from grabbing every core of a 2-core CI box per xdist worker.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
# 8 virtual CPU devices for tests/parallel (sharded steps on 8-device meshes), set here because XLA reads the flag
# once, when the backend starts. Everything else is unaffected: jit and device_put still place on device 0.
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The XLA:CPU flags and host settings the entry points apply (deepseek_jax.compat.use_cpu_settings): the tests run
# what users run.
from deepseek_jax import compat  # noqa: E402  (imports jax; its backends start later, at the first computation)

compat.use_cpu_settings()
# One persistent compilation cache for the whole session, inherited by the subprocesses of the loop tests, so
# identical train steps compiled by several runs (kill / resume) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
