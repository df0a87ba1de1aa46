"""What a training run is, as config: the ModelConfig of a run, its batch plan (the paper's batch-size ramp), the
compute dtype, the parallel fields of config files, and the stored-config comparison that decides whether a
directory can be resumed. Experiment configs (experiments/configs/) and the driver (train/loop.py) both use it;
it knows nothing of meshes, checkpoints or the training loop itself.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import jax
import ml_collections

from deepseek_jax import config as config_lib
from deepseek_jax.train.optimizer import batch_size_at

# Fields that may differ between a run and its resumption (they do not change the computation).
RESUMABLE_KEYS = ("loop.overwrite", "loop.progress", "loop.step_delay_s", "loop.mesh", "loop.out_dir",
                   "loop.max_skipped_fraction")
# Optional fields left out of the comparison while at their default, so runs made before they existed still match.
OMITTED_AT_DEFAULT = {"loop.ep_capacity_factor": None}


class RunError(RuntimeError):
    """A run that cannot start or must stop; the message says why and what to do."""


def flat_config(cfg: ml_collections.ConfigDict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def comparable_config(cfg) -> Dict[str, Any]:
    """The config as a run stores it in config.json and compares it on resume (resumable fields left out)."""
    flat = json.loads(json.dumps(flat_config(cfg), default=str))
    return {k: v for k, v in flat.items()
            if k not in RESUMABLE_KEYS and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


def config_diff(theirs: Dict[str, Any], mine: Dict[str, Any]) -> list:
    """The fields in which two stored configs (config.json dicts) differ, resumable fields left out on both
    sides (config.json files written before loop.out_dir became resumable still hold it)."""
    theirs = {k: v for k, v in theirs.items() if k not in RESUMABLE_KEYS}
    mine = {k: v for k, v in mine.items() if k not in RESUMABLE_KEYS}
    return sorted(k for k in set(theirs) | set(mine) if theirs.get(k, "<absent>") != mine.get(k, "<absent>"))


def parallel_fields() -> Dict[str, Any]:
    """The loop fields of a parallel run, for config files: ``loop = ConfigDict(dict(..., **parallel_fields()))``
    makes ``--config.loop.mesh=data=2,expert=4`` and ``--config.loop.ep_capacity_factor=1.25`` settable."""
    return {"mesh": "", "ep_capacity_factor": ml_collections.FieldReference(None, field_type=float)}


def compute_dtype(requested: str = "auto", backend: Optional[str] = None) -> str:
    """The training compute dtype: ``model.compute_dtype`` = "auto" picks bfloat16 on accelerators (the paper's
    mixed precision: BF16 compute, FP32 master weights) and float32 on CPU, where XLA's bf16 matmul is no faster
    (1024x1024: 49 ms bf16 vs 43 ms fp32 on the 2-core EPYC dev machine, jax 0.10.2) and fp32 keeps results
    comparable with the parity tests. An explicit dtype is used as given."""
    if requested != "auto":
        return requested
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def model_config(cfg, tokenizer) -> config_lib.ModelConfig:
    """The ModelConfig of a run: the preset, its overrides, the tokenizer's vocabulary and EOS, and the compute
    dtype (``model.compute_dtype``, "auto" by default; an explicit ``overrides.dtype`` wins)."""
    overrides = dict(cfg.model.get("overrides", {}) or {})
    overrides.update(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, bos_token_id=None)
    overrides.setdefault("dtype", compute_dtype(cfg.model.get("compute_dtype", "auto")))
    try:
        return config_lib.preset(cfg.model.preset, **overrides)
    except ValueError as e:
        raise RunError(f"model (model.preset={cfg.model.preset!r} + model.overrides): {e}") from None


class BatchPlan:
    """Global batch size (sequences) of every step, and how it splits into micro-batches.

    Without ``data.batch_ramp`` every step has ``data.batch_size`` sequences in ``loop.grad_accum`` micro-batches.
    With ``data.batch_ramp = {start, tokens}`` the global batch follows the paper's ramp (V3 §4.2: 3072 -> 15360
    sequences over the first 469B tokens) from ``start`` to ``data.batch_size`` over ``tokens`` training tokens,
    through ``optimizer.batch_size_at`` (linear in tokens seen, rounded down to whole micro-batches). The
    micro-batch stays ``data.batch_size // loop.grad_accum`` sequences (memory is constant); the number of
    micro-batches grows with the batch, and each distinct count compiles the step once.

    The size of step s depends only on the config and s (tokens seen before s = the sum of the earlier steps'
    sizes times seq_len), so a resumed run recomputes it exactly; the LR and the other schedules keep counting
    steps (PAPER_* schedules in optimizer.py note why that is close to the paper's token clock).
    """

    def __init__(self, data_cfg, grad_accum: int):
        self.end, self.n_micro, self.seq_len = int(data_cfg.batch_size), int(grad_accum), int(data_cfg.seq_len)
        if self.n_micro < 1 or self.end % self.n_micro:
            raise RunError(f"data.batch_size={self.end} is not divisible by loop.grad_accum={self.n_micro}")
        self.micro = self.end // self.n_micro
        ramp = data_cfg.get("batch_ramp", None)
        self.ramp = None
        if ramp is not None:
            start, tokens = int(ramp.start), float(ramp.tokens)
            if not 0 < start <= self.end or start % self.micro:
                raise RunError(f"data.batch_ramp.start={start} must be in (0, data.batch_size={self.end}] and a "
                               f"multiple of the micro-batch data.batch_size / loop.grad_accum = {self.micro}")
            if tokens < 0:
                raise RunError(f"data.batch_ramp.tokens={tokens} must be >= 0")
            self.ramp = (start, tokens)
        self._sizes, self._tokens = [], 0.0

    def size(self, step: int) -> int:
        """Global batch size of step ``step`` (0-based)."""
        if self.ramp is None:
            return self.end
        while len(self._sizes) <= step:
            bs = batch_size_at(self._tokens, self.ramp[0], self.end, self.ramp[1], multiple=self.micro)
            self._sizes.append(bs)
            self._tokens += bs * self.seq_len
        return self._sizes[step]
