"""The training driver: data -> train_step -> metrics -> checkpoints, with progress, validation and resume.

``run(config)`` takes an ml_collections ConfigDict (see experiments/configs/quickstart.py for every field):

  model.preset / model.overrides   the architecture (vocab and EOS come from the tokenizer)
  data.*                           corpus ("default" = the pinned built-in snapshot, deepseek_jax/data/corpus.py),
                                   tokenizer, seq_len, batch_size, fim_rate, val_fraction, seed,
                                   batch_ramp (optional: start, tokens -> the paper's batch-size ramp)
  train                            deepseek_jax.train.step.default_train_config(...) (recipe, schedules)
  loop.*                           out_dir, ckpt_every, keep, eval_every, eval_batches, log_every, seed,
                                   overwrite, sample_prompt, sample_tokens, grad_accum,
                                   mesh (optional: "" = one device; "data=2,expert=4" ... = sharding.py),
                                   ep_capacity_factor (optional: None = dropless expert-parallel buffers)

Parallel runs (``loop.mesh``): the state is initialised sharded (each device materialises only its shards),
the step is ``parallel.step.shard_train_step`` (NamedSharding in/out, shard_map + all-to-all for the experts),
validation runs on the same mesh, and orbax writes and restores the sharded state. Every process of a
multi-process job (``jax.distributed.initialize()`` before ``run``; experiments/run.py does it with
``--distributed``) reads the same deterministic data and keeps only its shards of each batch; only process 0
writes logs, plots and summary.json. The mesh may change between a run and its resumption (orbax reshards);
the bitwise resume guarantee holds for an unchanged mesh.

Guarantees:
- The whole config is validated (fields named, nothing written) before the output directory is touched.
- Rerunning the same command resumes from the newest checkpoint that restores: a corrupt one (unreadable, or
  failing its content checksums) is moved aside to ``checkpoints/<step>.corrupt`` with one line on stderr (the
  details in ``<out_dir>/run.log``), so the rerun can save that step again. Everything that determines the
  future is in the checkpoint: params, optimizer state, router bias, step (the clock of every schedule),
  skipped-step count and the data iterator's state, so a run killed at any point and restarted ends bitwise
  identical to an uninterrupted one (benchmarks/kill_resume.py kills at 10 random points).
- SIGTERM / SIGINT finish the current step, write a checkpoint, and exit.
- A non-finite loss or gradient never changes the state (train_step skips the update), so no checkpoint ever
  holds one; with ``train.nonfinite = "stop"`` the run stops at once with a message and writes nothing.
- An output directory created by a different config is refused unless ``loop.overwrite`` is set, which moves
  the old directory aside to ``<out_dir>.replaced-<time>`` (nothing is deleted), and refuses when it holds
  files this run does not write. A run directory moved to a new path resumes (``loop.out_dir`` is not compared);
  one holding checkpoints but no config.json is refused (its config cannot be checked).
- A run that skipped more than ``loop.max_skipped_fraction`` of its steps (non-finite loss, gradient or state)
  ends with a RunError (``experiments.run`` exits 3) after writing its checkpoint and summary.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax import data as data_lib
from deepseek_jax import generate as generate_lib
from deepseek_jax import sharding
from deepseek_jax.checkpoint import CheckpointError, Checkpointer, abstract_like
from deepseek_jax.parallel import step as sharded
from deepseek_jax.metrics import MetricsWriter, bits_per_byte, truncate_jsonl
from deepseek_jax.provenance import git_rev, machine
from deepseek_jax.train import losses
from deepseek_jax.plots import plot_run
from deepseek_jax.train.run_config import (BatchPlan, RunError, comparable_config, config_diff, model_config)
from deepseek_jax.train.step import init_train_state, make_eval_step, make_train_step, validate_train_config



# loop.max_skipped_fraction when a config does not set it: a healthy run skips no step.
DEFAULT_MAX_SKIPPED_FRACTION = 0.05
# What a run writes in its out_dir (``loop.overwrite`` moves aside a directory holding only these, and plots).
RUN_OUTPUTS = ("config.json", "checkpoints", "metrics.jsonl", "validation.jsonl", "summary.json", "tb", "run.log")


class TooManySkippedError(RunError):
    """The run finished (checkpoint and summary written) but skipped more steps than loop.max_skipped_fraction."""


def _code_version() -> str:
    """git HEAD of the code that runs, with "+dirty" when tracked files differ from it (uncommitted changes)."""
    return git_rev(dirty=True)


def machine_info() -> Dict[str, Any]:
    return machine()


def _int_field(cfg, field: str, low: int) -> None:
    v = cfg
    for p in field.split("."):
        v = v[p]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RunError(f"{field} must be an int >= {low}, got {v!r}")


def validate_config(cfg) -> None:
    """The loop, data and train fields of a run config; RunError naming the field (nothing is written)."""
    for field, low in (("loop.ckpt_every", 1), ("loop.log_every", 1), ("loop.keep", 1), ("loop.eval_every", 0),
                       ("loop.eval_batches", 0), ("loop.grad_accum", 1), ("loop.seed", 0), ("data.seq_len", 1),
                       ("data.batch_size", 1)):
        _int_field(cfg, field, low)
    for field, lo, hi in (("data.val_fraction", 0.0, 1.0), ("data.fim_rate", 0.0, 1.0)):
        v = cfg.data[field.split(".")[1]]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi) or (
                field == "data.val_fraction" and v == hi):
            raise RunError(f"{field} must be a number in [{lo}, {hi}{')' if field == 'data.val_fraction' else ']'}, "
                           f"got {v!r}")
    frac = cfg.loop.get("max_skipped_fraction", DEFAULT_MAX_SKIPPED_FRACTION)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
        raise RunError(f"loop.max_skipped_fraction must be a number in [0, 1], got {frac!r}")
    try:
        validate_train_config(cfg.train)
    except ValueError as e:
        raise RunError(str(e)) from None


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _move_aside(out: str) -> str:
    """loop.overwrite: rename the old run directory to ``<out>.replaced-<time>`` (never delete); refuse when it
    holds anything a run does not write."""
    foreign = sorted(n for n in os.listdir(out) if n not in RUN_OUTPUTS and not n.endswith(".png"))
    if foreign:
        raise RunError(f"loop.overwrite=True: {out} also holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, "
                       f"which no training run writes; refusing to move it. Use another --config.loop.out_dir")
    dst = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while os.path.exists(dst):
        n += 1
        dst = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}.{n}"
    os.rename(out, dst)
    print(f"loop.overwrite: moved the old run {out} aside to {dst}", file=sys.stderr)
    return dst


def _prepare_out_dir(cfg) -> str:
    """Check the output directory on process 0 (with loop.overwrite, move a different run's aside); the others
    wait for it."""
    out = os.path.abspath(cfg.loop.out_dir)
    if not _is_main_process():
        _sync("prepare_out_dir")
        return out
    path = os.path.join(out, "config.json")
    mine = comparable_config(cfg)
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)
            if not isinstance(theirs, dict):
                raise ValueError(f"a JSON object expected, got {type(theirs).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            raise RunError(f"{path} is not a run config ({type(e).__name__}); restore it or use another "
                           f"--config.loop.out_dir") from None
        diff = config_diff(theirs, mine)
        if diff:
            if not cfg.loop.overwrite:
                shown = ", ".join(f"{k}: {theirs.get(k, '<absent>')!r} -> {mine.get(k, '<absent>')!r}"
                                  for k in diff[:8])
                raise RunError(f"output directory {out} was made by a different config ({shown}"
                               f"{' ...' if len(diff) > 8 else ''}). Use another --config.loop.out_dir, or pass "
                               f"--config.loop.overwrite=True to move the old run aside and start over.")
            _move_aside(out)
    elif os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        if not cfg.loop.overwrite:
            raise RunError(f"output directory {out} holds checkpoints/ but no config.json, so the config they were "
                           f"trained with cannot be checked. Restore its config.json, use another "
                           f"--config.loop.out_dir, or pass --config.loop.overwrite=True to move it aside.")
        _move_aside(out)
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(mine, f, indent=1, sort_keys=True)
    _sync("prepare_out_dir")
    return out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _parallel(cfg, plan):
    """(mesh, ep_capacity_factor) from loop.mesh / loop.ep_capacity_factor; (None, None) for one device. Checks
    that every batch the run will see splits evenly over the mesh's batch axes, naming the fields."""
    spec = cfg.loop.get("mesh", "") or ""
    if not spec:
        return None, None
    try:
        n_dev = math.prod(sharding.mesh_shape(spec).values())
        # one process may use the first n of its devices; a multi-process mesh spans every device of the job
        devices = jax.devices()[:n_dev] if jax.process_count() == 1 else None
        mesh = sharding.make_mesh(spec, devices)
    except ValueError as e:
        raise RunError(f"loop.mesh={spec!r}: {e}") from None
    n = sharding.batch_axes_size(sharding.axis_sizes(mesh))
    if plan.micro % n or cfg.data.batch_size % n:
        raise RunError(f"loop.mesh={spec!r} splits every batch over data*fsdp*expert = {n} devices, but the "
                       f"micro-batch (data.batch_size / loop.grad_accum = {plan.micro}) or the validation batch "
                       f"(data.batch_size = {cfg.data.batch_size}) is not a multiple of {n}")
    cf = cfg.loop.get("ep_capacity_factor", None)
    if cf is not None and not float(cf) > 0:
        raise RunError(f"loop.ep_capacity_factor must be None (dropless) or > 0, got {cf!r}")
    return mesh, (None if cf is None else float(cf))


class _Stop:
    """SIGTERM/SIGINT -> finish the step, checkpoint, exit."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def evaluate(eval_step, state, batches) -> Dict[str, float]:
    """Validation loss, bits per byte and MaxVio_global (loads summed over the whole validation set).

    Also ``loss_batches``, the mean CE of each validation batch (the same batches in every run of a config), and
    ``loss_se``, the standard error of the validation loss from their spread, std / sqrt(n_batches): the
    sampling error of the validation set itself (docs/experiments.md)."""
    ce_sum = count = n_bytes = 0.0
    load = None
    per_batch = []
    for b in batches:
        r = eval_step(state.params, state.router, {"tokens": b["tokens"], "mask": b["mask"]})
        ce_sum += float(r["ce_sum"])
        count += float(r["count"])
        per_batch.append(float(r["ce_sum"]) / max(float(r["count"]), 1.0))
        n_bytes += float(np.sum(b["target_bytes"]))
        load = np.asarray(r["load"]) if load is None else load + np.asarray(r["load"])
    out = {"loss": ce_sum / max(count, 1.0), "bpb": bits_per_byte(ce_sum, n_bytes), "tokens": count}
    if len(per_batch) > 1:
        out["loss_se"] = float(np.std(per_batch, ddof=1) / np.sqrt(len(per_batch)))
        out["loss_batches"] = per_batch
    if load is not None and load.size:
        out["max_vio_global"] = float(losses.max_vio(jnp.asarray(load)))
    return out


def run(cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
    for field in ("corpus", "tokenizer"):  # paper-scale configs leave both to the user
        if not str(cfg.data.get(field, "") or "").strip():
            raise RunError(f"data.{field} is empty: set it, e.g. --config.data.{field}=... (see "
                           f"deepseek_jax/data for the corpus and tokenizer specs)")
    # ---- everything is checked (and the data loaded) before the output directory is touched ----
    validate_config(cfg)
    plan = BatchPlan(cfg.data, cfg.loop.grad_accum)  # the batch fields
    mesh, ep_cf = _parallel(cfg, plan)  # and the mesh against them
    try:
        tok = data_lib.get_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError) as e:
        raise RunError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    mcfg = model_config(cfg, tok)
    try:
        docs = data_lib.load_corpus(cfg.data.corpus)
        train_docs, val_docs = data_lib.split(docs, cfg.data.val_fraction)
    except (ValueError, OSError) as e:
        raise RunError(f"data.corpus={cfg.data.corpus!r}: {e}") from None
    if not train_docs:
        raise RunError(f"data.corpus={cfg.data.corpus!r}: no training documents after the validation split "
                       f"(data.val_fraction={cfg.data.val_fraction})")
    if cfg.loop.eval_every and not val_docs:
        raise RunError(f"data.corpus={cfg.data.corpus!r}: no validation documents with data.val_fraction="
                       f"{cfg.data.val_fraction}; raise it, or turn evaluation off with loop.eval_every=0")
    fp = data_lib.fingerprint(docs)
    try:
        it = data_lib.make_train_iterator(train_docs, tok, seq_len=cfg.data.seq_len,
                                          batch_size=cfg.data.batch_size, seed=cfg.data.seed,
                                          fim_rate=cfg.data.fim_rate, vocab_size=mcfg.vocab_size,
                                          corpus_fingerprint=fp)
        val_batches = (data_lib.make_eval_batches(val_docs, tok, cfg.data.seq_len, cfg.data.batch_size,
                                                  max_batches=cfg.loop.eval_batches or None)
                       if cfg.loop.eval_every else [])
    except ValueError as e:
        raise RunError(f"data: {e}") from None
    out_dir = _prepare_out_dir(cfg)
    # ---- state ----
    tc = cfg.train
    total = int(tc.total_steps)
    if mesh is None:
        state = init_train_state(mcfg, tc, jax.random.PRNGKey(cfg.loop.seed), seq_len=cfg.data.seq_len)
        train_step = jax.jit(make_train_step(mcfg, tc), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(mcfg))
    else:
        state = sharded.init_sharded_state(mcfg, tc, mesh, jax.random.PRNGKey(cfg.loop.seed), cfg.data.seq_len)
        train_step = sharded.shard_train_step(mcfg, tc, mesh, ep_capacity_factor=ep_cf)
        eval_step = sharded.shard_eval_step(mcfg, mesh, ep_capacity_factor=ep_cf)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=cfg.loop.keep,
                        log_path=os.path.join(out_dir, "run.log") if _is_main_process() else None)
    meta_base = {"config": comparable_config(cfg), "model_config": mcfg.to_dict(), "corpus_fingerprint": fp,
                 "corpus": {"docs": len(docs), "train_docs": len(train_docs), "val_docs": len(val_docs),
                            "bytes": data_lib.total_bytes(docs), "source": data_lib.corpus_source(cfg.data.corpus)},
                 "code_version": _code_version(), "machine": machine_info(),
                 "mesh": dict(mesh.shape) if mesh is not None else None, "processes": jax.process_count()}
    try:
        restored = ckpt.restore_latest(abstract_like(state))
    except CheckpointError as e:
        raise RunError(f"{e}; rerun to start from step 0") from None
    if restored is not None:
        start, state, data_state, _ = restored
        it.set_state(data_state)
        print(f"resuming {out_dir} from step {start}")
    else:
        start = 0
    main = _is_main_process()
    writer = MetricsWriter(out_dir) if main else _NullWriter()
    val_writer = MetricsWriter(out_dir, "validation", tensorboard=False) if main else _NullWriter()
    if main:
        truncate_jsonl(writer.path, start)
        # from step 0 the step-0 validation is rerun: drop one left by a run killed before its first checkpoint
        truncate_jsonl(val_writer.path, start if start > 0 else -1)

    def save(step):
        ckpt.save(step, state, it.get_state(), dict(meta_base, step=int(step)))

    progress = None
    if cfg.loop.get("progress", True) and main:
        from tqdm import tqdm
        progress = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
                        mininterval=1.0)
    t_last, tokens_last = time.perf_counter(), 0
    step = start
    stopped_by = None
    last_val = None
    with _Stop() as stop:
        if start == 0 and cfg.loop.eval_every:
            last_val = evaluate(eval_step, state, val_batches)
            val_writer.write(0, last_val)
        while step < total:
            bs = plan.size(step)
            batch = it.next_batch(bs)
            tokens = batch["tokens"].reshape(bs // plan.micro, plan.micro, batch["tokens"].shape[-1])
            state, m = train_step(state, {"tokens": tokens})
            step += 1
            if cfg.loop.get("step_delay_s", 0.0):  # test hook: widen the window for an external kill
                jax.block_until_ready(m)
                time.sleep(cfg.loop.step_delay_s)
            if float(m["nonfinite"]) and tc.nonfinite == "stop":
                raise RunError(f"step {step}: non-finite loss or gradient (loss={float(m['loss'])}, "
                               f"grad_norm={float(m['grad_norm'])}); stopping without a checkpoint of this step "
                               f"(train.nonfinite='stop'). The newest checkpoint is clean: {ckpt.steps()}")
            tokens_last += int(np.prod(batch["tokens"][:, 1:].shape))
            if step % cfg.loop.log_every == 0 or step == total:
                now = time.perf_counter()
                rec = {k: v for k, v in jax.device_get(m).items()}
                rec["tokens_per_s"] = tokens_last / max(now - t_last, 1e-9)
                rec["batch_size"] = bs
                rec["bpb_train"] = float(rec["ce"]) * float(np.prod(batch["tokens"][:, 1:].shape)) / (
                    np.log(2) * max(float(np.sum(batch["target_bytes"])), 1.0))
                writer.write(step, rec)
                t_last, tokens_last = now, 0
                if progress is not None:
                    progress.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                         maxvio=f"{rec['max_vio_batch']:.2f}", refresh=False)
            if progress is not None:
                progress.update(1)
            if cfg.loop.eval_every and (step % cfg.loop.eval_every == 0 or step == total):
                last_val = evaluate(eval_step, state, val_batches)
                val_writer.write(step, last_val)
                if progress is not None:
                    progress.write(f"step {step}: val loss {last_val['loss']:.4f}  bpb {last_val['bpb']:.4f}  "
                                   f"MaxVio_global {last_val.get('max_vio_global', float('nan')):.3f}")
            if step % cfg.loop.ckpt_every == 0 or step == total:
                save(step)
            if stop.requested:
                stopped_by = stop.requested
                if step % cfg.loop.ckpt_every and step != total:
                    save(step)
                break
    if progress is not None:
        progress.close()
    writer.close()
    val_writer.close()
    ckpt.close()
    summary = {"out_dir": out_dir, "step": step, "total_steps": total, "stopped_by": stopped_by,
               "skipped_steps": int(state.skipped), "validation": last_val, **meta_base}
    if stopped_by:
        print(f"\n{stopped_by}: checkpoint written at step {step}; rerun the same command to resume.")
        return summary
    max_frac = float(cfg.loop.get("max_skipped_fraction", DEFAULT_MAX_SKIPPED_FRACTION))
    too_many = summary["skipped_steps"] > max_frac * step
    summary["skipped_fraction_exceeded"] = bool(too_many)
    # the sample decodes on process-local arrays; a multi-process run has no process holding the whole state
    summary["sample"] = (sample_after_training(cfg, mcfg, state, tok) if jax.process_count() == 1
                         else None)
    if main:
        summary["plots"] = plot_run(out_dir)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    if too_many:
        msg = (f"{summary['skipped_steps']} of {step} steps were skipped for a non-finite loss, gradient or state "
               f"(more than loop.max_skipped_fraction={max_frac}): the parameters saw only the other updates, so "
               f"this run's numbers do not describe its config. Lower the learning rate or look at metrics.jsonl "
               f"(nonfinite, grad_norm); the checkpoint and summary of {out_dir} are kept")
        print("\n" + "!" * 100 + f"\nWARNING: {msg}\n" + "!" * 100, file=sys.stderr)
        err = TooManySkippedError(msg)
        err.summary = summary
        raise err
    return summary


class _NullWriter:
    """The metrics writer of processes other than 0."""

    def write(self, step, rec):
        pass

    def close(self):
        pass


def sample_after_training(cfg, mcfg, state, tok) -> Optional[Dict[str, str]]:
    """A completion of loop.sample_prompt (loop.sample_tokens tokens) by the trained model, for the summary."""
    prompt = cfg.loop.get("sample_prompt", "")
    if not prompt or not cfg.loop.get("sample_tokens", 0):
        return None
    ids = tok.encode(prompt)
    new = generate_lib.generate(mcfg, {"params": state.params, "router": state.router}, ids,
                                max_new_tokens=int(cfg.loop.sample_tokens),
                                temperature=float(cfg.loop.get("sample_temperature", 0.8)), top_k=40,
                                seed=int(cfg.loop.seed), eos_id=tok.eos_id)
    return {"prompt": prompt, "completion": tok.decode(new)}
