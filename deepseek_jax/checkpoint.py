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
