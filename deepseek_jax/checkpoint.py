"""Checkpoints with orbax: the training state, the data iterator's state and run metadata, saved together.

A checkpoint is a directory ``<run>/checkpoints/<step>/`` written by orbax's CheckpointManager, which writes to a
temporary name and renames when complete, so a run killed mid-save leaves no half-written step behind. Each step
holds three items:

  state  the TrainState pytree (params, optimizer state, router bias, step, ...), arrays via orbax
  data   the data iterator's JSON state (so resume continues the exact token stream)
  meta   JSON: config, corpus fingerprint, code version, metrics at save time

``restore_latest`` walks back from the newest step: a step that fails to restore (corrupt file, missing item)
is reported with a warning and the previous one is tried. Only files written by orbax are read (no pickle).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


class CheckpointLayoutError(CheckpointError):
    """The checkpoint's params/router tree is not this model's: no earlier step can do better, so no fallback."""


# Variable paths renamed by layout changes, (old suffix, new suffix): docs/checkpoint_format.md "Parameter paths".
RENAMED_PATHS = (("mlp/router_kernel", "mlp/router/kernel"), ("mlp/bias", "mlp/router/bias"))


def _paths(tree) -> set:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p) for p, _ in leaves}


def check_layout(saved_state, abstract_state, where: str) -> None:
    """Compare the saved state's "params" / "router" trees with ``abstract_state``'s (a TrainState or dict):
    CheckpointLayoutError naming the new path when a variable was renamed by a layout change (RENAMED_PATHS),
    CheckpointError naming missing / unexpected paths for any other difference."""
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
            raise CheckpointError(f"{where}: the checkpoint's {col} do not match this model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "data", "meta"))

    def steps(self):
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: Dict, meta: Dict) -> None:
        self._mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict, Dict]:
        saved = self._mngr.item_metadata(int(step))["state"]
        check_layout(getattr(saved, "tree", saved), abstract_state, os.path.join(self.directory, str(step)))
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def restore_latest(self, abstract_state: Any) -> Optional[Tuple[int, Any, Dict, Dict]]:
        """(step, state, data_state, meta) of the newest checkpoint that restores, or None if there is none."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                state, data, meta = self.restore(step, abstract_state)
                return step, state, data, meta
            except CheckpointLayoutError:
                raise
            except Exception as e:  # corrupt or partial: fall back to the previous step
                warnings.warn(f"checkpoint {os.path.join(self.directory, str(step))} could not be restored "
                              f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous one")
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} could be restored")
        return None

    def close(self):
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) to restore into."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
