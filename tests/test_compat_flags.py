"""deepseek_jax.compat.use_cpu_xla_flags: the XLA:CPU flags the entry points add, and when they must not."""

import subprocess
import sys

from deepseek_jax import compat


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
