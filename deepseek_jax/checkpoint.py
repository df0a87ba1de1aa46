"""Checkpoints with orbax: the training state, the data iterator's state and run metadata, saved together.

A checkpoint is a directory ``<run>/checkpoints/<step>/`` written by orbax's CheckpointManager, which writes to a
temporary name and renames when complete, so a run killed mid-save leaves no half-written step behind. Each step
holds three items:

  state  the TrainState pytree (params, optimizer state, router bias, step, ...), arrays via orbax
  data   the data iterator's JSON state (so resume continues the exact token stream)
  meta   JSON: config, corpus fingerprint, code version, metrics at save time, and ``checksums``

Content checksums. orbax (0.12, as configured here) writes each array as zstd-compressed zarr chunks inside an
OCDBT key-value store and keeps no checksum of the array data: a flipped bit in a data file either breaks
decoding (TensorStore reports it) or restores without error as wrong values. ``save`` therefore records the
sha256 of every state leaf (its dtype, shape and bytes) and of the data state in ``meta["checksums"]``, and
``restore`` recomputes and compares them: a mismatch is a corrupt checkpoint. Leaves that no single process
holds whole (multi-process runs) are not checksummed.

``restore_latest`` walks back from the newest step: a step that fails to restore (corrupt file, missing item,
checksum mismatch) is moved aside to ``<step>.corrupt`` (kept, never deleted; orbax ignores the name), reported
in one line on stderr (the full error goes to the ``log_path`` file when one is given), and the previous step is
tried, so a rerun never meets the bad step again. Only files written by orbax are read (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import traceback
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKSUMS = "checksums"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
    pass


def _key_part(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_key(path) -> str:
    """'params/embed/embedding' for a pytree key path (dicts, dataclasses and sequences alike)."""
    return "/".join(_key_part(k) for k in path)


def leaf_digest(leaf) -> Optional[str]:
    """sha256 of a leaf's dtype, shape and bytes; None when this process does not hold the whole array."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return None
    a = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return h.hexdigest()


def state_digests(tree) -> Dict[str, str]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        d = leaf_digest(leaf)
        if d is not None:
            out[leaf_key(path)] = d
    return out


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(tree, data: Optional[Dict], meta: Dict, where: str, only: Tuple[str, ...] = ()) -> None:
    """Raise CheckpointError when a restored leaf (or the data state) differs from its checksum in ``meta``.
    ``only``: check just the leaves under these top-level names (e.g. ("params", "router")); every checksum of
    those names must then be matched by a restored leaf. A checkpoint written before checksums existed passes."""
    sums = meta.get(CHECKSUMS)
    if sums is None:
        return
    if not isinstance(sums, dict) or not isinstance(sums.get("state"), dict):
        raise CheckpointError(f"{where}: meta.checksums is malformed")
    want = sums["state"]
    got = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = leaf_key(path)
        if only and key.split("/", 1)[0] not in only:
            continue
        got[key] = leaf
    for key, digest in want.items():
        if only and key.split("/", 1)[0] not in only:
            continue
        if key not in got:
            raise CheckpointError(f"{where}: state leaf {key} is missing")
        d = leaf_digest(got[key])
        if d is not None and d != digest:
            raise CheckpointError(f"{where}: content checksum mismatch in state leaf {key}")
    if data is not None and sums.get("data") is not None and json_digest(data) != sums["data"]:
        raise CheckpointError(f"{where}: content checksum mismatch in the data iterator state")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}{'...' if len(msg) > 200 else ''}"


class _QuietLibraries:
    """Route the absl/orbax/tensorstore Python loggers to ``log_path`` (or nowhere) while active, so a failed
    restore prints one line of ours instead of the libraries' tracebacks."""

    NAMES = ("absl", "orbax", "tensorstore", "asyncio")

    def __init__(self, log_path: Optional[str]):
        self.log_path = log_path

    def __enter__(self):
        self._saved = []
        self._handler = logging.FileHandler(self.log_path) if self.log_path else logging.NullHandler()
        for name in self.NAMES:
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.propagate, list(lg.handlers)))
            lg.propagate = False
            lg.handlers = [self._handler]
        return self

    def __exit__(self, *exc):
        for lg, prop, handlers in self._saved:
            lg.propagate, lg.handlers = prop, handlers
        self._handler.close()


class CheckpointLayoutError(CheckpointError):
    """The checkpoint's params/router tree is not this model's: no earlier step can do better, so no fallback."""


# Variable paths renamed by layout changes, (old suffix, new suffix): docs/checkpoint_format.md "Parameter paths".
RENAMED_PATHS = (("mlp/router_kernel", "mlp/router/kernel"), ("mlp/bias", "mlp/router/bias"))


def _paths(tree) -> set:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {leaf_key(p) for p, _ in leaves}


def check_layout(saved_state, abstract_state, where: str) -> None:
    """Compare the saved state's "params" / "router" trees with ``abstract_state``'s (a TrainState or dict):
    CheckpointLayoutError naming the new path when a variable was renamed by a layout change (RENAMED_PATHS), or
    naming the missing / unexpected paths for any other difference. A layout mismatch is not corruption: the step
    is neither moved aside nor skipped for an older one."""
    for col in ("params", "router"):
        saved = _paths({col: saved_state.get(col, {})}) if isinstance(saved_state, dict) else set()
        want = _paths({col: abstract_state.get(col, {}) if isinstance(abstract_state, dict)
                       else getattr(abstract_state, col, {})})
        missing, unexpected = sorted(want - saved), sorted(saved - want)
        if not missing and not unexpected:
            continue
        for old, new in RENAMED_PATHS:
            for p in unexpected:
                if p.endswith(old) and p[:-len(old)] + new in missing:
                    raise CheckpointLayoutError(
                        f"{where}: written by an older version of deepseek_jax: {p} is now {p[:-len(old)] + new} "
                        f"(docs/checkpoint_format.md); export it with that version (hf.save_pretrained) and load "
                        f"the safetensors with hf.load_pretrained")
        if saved:  # (unreadable metadata reads as empty: the restore itself then fails and is reported)
            raise CheckpointLayoutError(f"{where}: the checkpoint's {col} do not match this model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")


class Checkpointer:
    """keep: how many of the newest steps to keep (an int >= 1; orbax deletes older ones after each save).
    log_path: a file for the full text of restore failures (the console gets one line each)."""

    def __init__(self, directory: str, keep: int = 3, log_path: Optional[str] = None):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (checkpoints to keep), got {keep!r}")
        self.directory = os.path.abspath(directory)
        self.log_path = log_path
        self._mngr = self._manager(keep)

    def _manager(self, keep):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "data", "meta"))

    def steps(self):
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: Dict, meta: Dict) -> None:
        meta = dict(meta, **{CHECKSUMS: {"state": state_digests(state), "data": json_digest(data_state)}})
        self._mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict, Dict]:
        """(state, data_state, meta) of ``step``, checksums verified (CheckpointError on a mismatch)."""
        saved = self._mngr.item_metadata(int(step))["state"]
        check_layout(getattr(saved, "tree", saved), abstract_state, os.path.join(self.directory, str(step)))
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        verify(out["state"], out["data"], meta, os.path.join(self.directory, str(step)))
        meta.pop(CHECKSUMS, None)
        return out["state"], out["data"], meta

    def restore_untargeted(self, step: int, only: Tuple[str, ...] = ("params", "router")) -> Tuple[Any, Dict, Dict]:
        """(state as saved, data_state, meta) without a target (generate.py: no TrainState to restore into); the
        checksums of the leaves under ``only`` (all leaves when empty) and of the data state are verified."""
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        verify(out["state"], out["data"], meta, os.path.join(self.directory, str(step)), only=only)
        meta.pop(CHECKSUMS, None)
        return out["state"], out["data"], meta

    def move_aside(self, step: int) -> str:
        """Rename ``<dir>/<step>`` to ``<dir>/<step>.corrupt`` (``.corrupt.1``, ... if taken); returns the path."""
        src = os.path.join(self.directory, str(step))
        dst, n = src + CORRUPT_SUFFIX, 0
        while os.path.exists(dst):
            n += 1
            dst = f"{src}{CORRUPT_SUFFIX}.{n}"
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # lazy: only multi-process runs sync
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self._mngr.reload()
        return dst

    def restore_latest(self, abstract_state: Any, restore_fn=None,
                       move_aside: bool = True) -> Optional[Tuple[int, Any, Dict, Dict]]:
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None if there is none.
        A step that fails is moved aside (``move_aside``; a reader such as generate.py passes False and leaves
        it) with one line on stderr, and the previous one tried. ``restore_fn(step) -> (state, data, meta)``
        replaces ``self.restore`` (generate.py restores untargeted)."""
        restore_fn = restore_fn or (lambda s: self.restore(s, abstract_state))
        steps = self.steps()
        failed = []
        for step in reversed(steps):
            try:
                with _QuietLibraries(self.log_path):
                    state, data, meta = restore_fn(step)
                return step, state, data, meta
            except CheckpointLayoutError:
                raise
            except Exception as e:  # corrupt or partial: keep it aside, fall back to the previous step
                if self.log_path:
                    with open(self.log_path, "a") as f:
                        f.write(f"restore of step {step} failed:\n{traceback.format_exc()}\n")
                where = (f"moved aside to {self.move_aside(step)}" if move_aside else
                         f"skipped ({os.path.join(self.directory, str(step))})")
                failed.append(step)
                print(f"checkpoint step {step} could not be restored ({_one_line(e)}); {where}"
                      + (f" (details in {self.log_path})" if self.log_path else ""), file=sys.stderr)
        if steps:
            raise CheckpointError(f"none of the checkpoints {failed} in {self.directory} could be restored"
                                  + (f"; they were moved aside to <step>{CORRUPT_SUFFIX}" if move_aside else ""))
        return None

    def close(self):
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) to restore into."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
