"""Train one experiment config.

    python -m experiments.run --config=experiments/configs/quickstart.py [--config.train.total_steps=500 ...]
    python -m experiments.run --config=... --config.loop.mesh=data=2,expert=4        # 8 devices of one process
    python -m experiments.run --distributed --config=... --config.loop.mesh=...      # on every host of a job

Rerunning the same command resumes from the newest checkpoint in ``loop.out_dir``. SIGTERM / Ctrl-C write a
checkpoint first. See deepseek_jax/train/loop.py for the guarantees.

Command-line overrides:
  --config.model.overrides.<field>=<value>   any ModelConfig field (a Python literal, else a string), also when
                                             the config file's model.overrides does not have it yet
  --config.train.total_steps / optim.peak_lr / optim.warmup_steps   the schedule fields derived from them
                                             (train.step.SCHEDULE_DERIVED) follow, unless also given
                                             (train.step.rederive_schedule)

Compiled steps are kept in JAX's persistent compilation cache (``--compile_cache``, default
~/.cache/deepseek_jax/jax_compilation_cache), so a rerun of the same shapes starts training at once.

Exit status: 0 done (or stopped by a signal after its checkpoint), 2 a config error (one ``error:`` line
naming the field; nothing written), 3 the run finished but skipped more than loop.max_skipped_fraction of its
steps.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import compat
from deepseek_jax.config import ModelConfig
from deepseek_jax.train.loop import RunError, TooManySkippedError, run
from deepseek_jax.train.step import rederive_schedule

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (python, get_config())",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() first (one process per host of a multi-host job; "
    "SLURM, Open MPI, TPU pods and GKE are detected, else give the three flags below)")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax", "jax_compilation_cache"),
    "JAX's persistent compilation cache for repeated runs of one shape ('' = off; JAX_COMPILATION_CACHE_DIR, "
    "when set, wins; not used with --distributed)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "with --distributed: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")


_MODEL_OVERRIDE = "--config.model.overrides."
_MODEL_OVERRIDES = {}  # --config.model.overrides.<field>=<value>, applied in main


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def _parse_flags(argv):
    """absl's flag parsing, with --config.model.overrides.<field> taken out first (config_flags can only set
    keys the config file already has) and every parse error as one ``error:`` line, exit 2."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    rest = []
    for a in argv:
        if not a.startswith(_MODEL_OVERRIDE):
            rest.append(a)
            continue
        key, eq, val = a[len(_MODEL_OVERRIDE):].partition("=")
        if not eq:
            _fail(f"{a}: expected --config.model.overrides.<field>=<value>")
        if key not in fields:
            _fail(f"model.overrides.{key}: not a ModelConfig field (deepseek_jax/config.py)")
        _MODEL_OVERRIDES[key] = _literal(val)
    sys.argv[:] = rest  # config_flags reads the --config.* overrides from sys.argv
    try:
        return flags.FLAGS(rest)
    except flags.Error as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        _fail(lines[-1] if lines else type(e).__name__)
    except (AttributeError, KeyError):  # config_flags: an override of a field the config does not have
        _fail(_unknown_override(rest))


def _unknown_override(argv) -> str:
    """The first --config.<path>=... whose path the config file does not have."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    base = flags.FLAGS["config"].parser.parse(path) if path else None
    for a in argv:
        if not a.startswith("--config.") or base is None:
            continue
        dotted = a[len("--config."):].split("=", 1)[0]
        node = base
        for i, part in enumerate(dotted.split(".")):
            if not hasattr(node, "keys") or part not in node:
                return (f"--config.{dotted}: the config has no field {'.'.join(dotted.split('.')[:i + 1])!r}"
                        + (" (any ModelConfig field can be set as --config.model.overrides.<field>)"
                           if dotted.startswith("model.") else ""))
            node = node[part]
    return "a --config.* override names a field the config does not have"


def _resolved_config():
    """The config after the command line: model overrides applied, the schedule fields re-derived."""
    cfg = _CONFIG.value
    flag = flags.FLAGS["config"]
    overridden = {k[len("train."):] for k in config_flags.get_override_values(flag) if k.startswith("train.")}
    if overridden:
        base = flag.parser.parse(config_flags.get_config_filename(flag))  # the file's config, no overrides
        try:
            changed = rederive_schedule(base.train, cfg.train, overridden)
        except ValueError as e:
            _fail(str(e))
        if changed:
            print(f"schedule: train.{', train.'.join(changed)} re-derived from the command line's values",
                  file=sys.stderr)
    if _MODEL_OVERRIDES:
        if "overrides" not in cfg.model:
            _fail("model.overrides: this config has no model.overrides to extend")
        with cfg.model.unlocked():
            merged = dict(cfg.model.overrides or {})
            merged.update(_MODEL_OVERRIDES)
            cfg.model.overrides = merged
    return cfg


def main(argv):
    del argv
    compat.use_cpu_settings()  # before jax starts its backends (BUILD.md "CPU speed")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    if _COMPILE_CACHE.value and not _DISTRIBUTED.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax
        jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE.value)  # a rerun of a shape skips compiling
    if _DISTRIBUTED.value:
        import jax
        # cross-process collectives of the CPU backend (no effect on GPU/TPU, which bring their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    try:
        summary = run(_resolved_config())
    except TooManySkippedError as e:
        _fail(str(e), code=3)
    except RunError as e:
        _fail(str(e))
    if summary.get("stopped_by"):
        sys.exit(0)
    val = summary.get("validation") or {}
    print(json.dumps({"out_dir": summary["out_dir"], "steps": summary["step"],
                      "val_loss": val.get("loss"), "val_bpb": val.get("bpb"),
                      "max_vio_global": val.get("max_vio_global"), "skipped_steps": summary["skipped_steps"],
                      "corpus_fingerprint": summary["corpus_fingerprint"]}, indent=1))
    if summary.get("sample"):
        sample = summary["sample"]
        print(f"\nsample (temperature 0.8, top-k 40) after {sample['prompt']!r}:\n{sample['completion']}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
