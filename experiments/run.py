"""Train one experiment config.

    python -m experiments.run --config=experiments/configs/quickstart.py [--config.train.total_steps=500 ...]
    python -m experiments.run --config=... --config.loop.mesh=data=2,expert=4        # 8 devices of one process
    python -m experiments.run --distributed --config=... --config.loop.mesh=...      # on every host of a job

Rerunning the same command resumes from the newest checkpoint in ``loop.out_dir``. SIGTERM / Ctrl-C write a
checkpoint first. See deepseek_jax/train/loop.py for the guarantees.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.train.loop import RunError, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (python, get_config())",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() first (one process per host of a multi-host job; "
    "SLURM, Open MPI, TPU pods and GKE are detected, else give the three flags below)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "with --distributed: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if _DISTRIBUTED.value:
        import jax
        # cross-process collectives of the CPU backend (no effect on GPU/TPU, which bring their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    try:
        summary = run(_CONFIG.value)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary.get("stopped_by"):
        sys.exit(0)
    val = summary.get("validation") or {}
    print(json.dumps({"out_dir": summary["out_dir"], "steps": summary["step"],
                      "val_loss": val.get("loss"), "val_bpb": val.get("bpb"),
                      "max_vio_global": val.get("max_vio_global"), "skipped_steps": summary["skipped_steps"],
                      "corpus_fingerprint": summary["corpus_fingerprint"]}, indent=1))
    if summary.get("sample"):
        print(f"\nsample (temperature 0.8, top-k 40) after {summary['sample']['prompt']!r}:\n{summary['sample']['completion']}")


if __name__ == "__main__":
    app.run(main)
