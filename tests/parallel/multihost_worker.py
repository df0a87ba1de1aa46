"""One process of the 2-process test (tests/parallel/test_multihost.py): jax.distributed on localhost with CPU
(gloo) collectives and 4 virtual devices per process; one sharded train step on an 8-device mesh spanning both
processes; process 0 writes the gathered result. Usage: multihost_worker.py PROCESS_ID PORT OUT_DIR MESH"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

pid, port, out_dir, mesh_spec = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
# No persistent compilation cache in the workers: two processes reading/writing the same entry was the one
# suspect of a hang seen once (process 1 never reached shutdown) when the suite's shared cache was enabled.
jax.config.update("jax_enable_compilation_cache", False)
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parallel_common import CFG, make_tokens  # noqa: E402
from test_sharded_step import _state, _train_cfg  # noqa: E402

from deepseek_jax import sharding
from deepseek_jax.parallel import step as sharded

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
tc = _train_cfg()
mesh = sharding.make_mesh(mesh_spec)
state = sharded.shard_state(_state(CFG, tc), CFG, tc, mesh)
step = sharded.shard_train_step(CFG, tc, mesh)
new, metrics = step(state, {"tokens": make_tokens(CFG, n_micro=2, b=8)})
gathered = multihost_utils.process_allgather({"params": new.params, "router": new.router}, tiled=True)
metrics = jax.device_get(metrics)
if pid == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    flat.update({f"metric:{k}": np.asarray(v) for k, v in metrics.items()})
    np.savez(os.path.join(out_dir, "result.npz"), **flat)
multihost_utils.sync_global_devices("multihost_worker done")  # both processes finish together
jax.distributed.shutdown()
