"""Train one experiment config.

    python -m experiments.run --config=experiments/configs/quickstart.py [--config.train.total_steps=500 ...]

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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
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
