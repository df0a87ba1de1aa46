"""deepseek_jax.compat.use_cpu_xla_flags / use_cpu_settings: the XLA:CPU flags and host settings the entry points
apply, and when they must not."""

import os
import subprocess
import sys

import pytest

from deepseek_jax import compat, host


def test_flags_added_once_and_user_settings_win():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert compat.use_cpu_xla_flags(env) == list(compat.CPU_XLA_FLAGS)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *compat.CPU_XLA_FLAGS]
    assert compat.use_cpu_xla_flags(env) == [] and env["XLA_FLAGS"].count("onednn") == 1  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_use_onednn=false"}  # the user's own value of the flag stays
    assert compat.use_cpu_xla_flags(mine) == [] and mine == {"XLA_FLAGS": "--xla_cpu_use_onednn=false"}
    off = {compat.NO_CPU_FLAGS_ENV: "1"}
    assert compat.use_cpu_xla_flags(off) == [] and "XLA_FLAGS" not in off


def test_every_flag_is_known_to_this_jaxlib():
    """XLA aborts the process on an unknown XLA_FLAGS entry, so each flag must exist on every tested stack:
    a fresh interpreter with only these flags runs a computation."""
    code = ("from deepseek_jax import compat; import os; assert compat.use_cpu_xla_flags(); "
            "import jax.numpy as jnp; print(float((jnp.ones((3, 3)) @ jnp.ones((3, 3))).sum()))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("XLA_FLAGS", compat.NO_CPU_FLAGS_ENV)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("27.0")


def test_too_late_changes_nothing():
    import jax
    jax.numpy.zeros(1).block_until_ready()  # backends are up in this process (tests/conftest.py set the flags)
    import os
    before = os.environ.get("XLA_FLAGS")
    assert compat.use_cpu_xla_flags() == []
    assert os.environ.get("XLA_FLAGS") == before


_FAULTS = """
import json, resource
from deepseek_jax import compat
applied = compat.use_cpu_settings()
import jax, jax.numpy as jnp
def g(a):  # no GEMM (a GEMM library's own scratch is not XLA's): ~100 MB of XLA's temporaries
    b = jnp.sort(jnp.sin(a), axis=0)
    c = jnp.sort(jnp.cos(a) + b, axis=1)
    return jnp.sum(b * c) + jnp.sum(jnp.cumsum(c, axis=0))
a = jnp.ones((3000, 3000), jnp.float32)
f = jax.jit(g).lower(a).compile()
f(a).block_until_ready()
faults = []  # per call: a call's first use of a new thread or arena faults in once, whatever the settings
for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "faults": faults, "temp_pages": f.memory_analysis().temp_size_in_bytes / 4096,
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"], "again": compat.use_cpu_settings()}))
"""


@pytest.mark.skipif(not host.is_glibc(), reason="glibc's malloc only")
def test_host_settings_keep_a_steps_memory():
    """compat.use_cpu_settings' host settings, observed through the kernel's page-fault counter in fresh processes:
    a jitted call whose temporaries (~100 MB) glibc would serve with mmap faults most of their pages in again at
    every call under the defaults (DEEPSEEK_JAX_NO_CPU_FLAGS=1: nothing applied), and almost none with the settings
    (the fewest of six calls: under load a call may first meet a new pool thread, whose arena faults in once);
    once jax's backends are up, a second call applies nothing."""
    import json
    out = {}
    for name, extra in (("on", {}), ("off", {compat.NO_CPU_FLAGS_ENV: "1"})):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", compat.NO_CPU_FLAGS_ENV)}
        r = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env={**env, **extra},
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    on, off = out["on"], out["off"]
    assert on["temp_pages"] > 64 * 2**20 / 4096  # larger than a malloc arena's heap: mmap under the defaults
    assert on["applied"][-2:] == list(compat.HOST_SETTINGS) and on["async"] is False and on["again"] == []
    assert off["applied"] == [] and off["async"] is True
    assert min(off["faults"]) > 0.5 * off["temp_pages"], out  # every call, again
    assert min(on["faults"]) < 0.05 * on["temp_pages"], out  # calls that find their memory kept
