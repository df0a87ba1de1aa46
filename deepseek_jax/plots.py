"""Plots of a run's curves, drawn from its JSON-lines logs after the run (never inside the timed loop)."""

from __future__ import annotations

import os

from deepseek_jax.metrics import read_jsonl


def plot_run(out_dir: str) -> list:
    """PNG plots of the training and validation curves, from the run's JSONL logs."""
    import matplotlib  # lazy: matplotlib is slow to import and only plotting needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    train = read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if os.path.exists(
        os.path.join(out_dir, "metrics.jsonl")) else []
    val_path = os.path.join(out_dir, "validation.jsonl")
    val = read_jsonl(val_path) if os.path.exists(val_path) else []
    if not train:
        return paths
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    s = [r["step"] for r in train]
    axes[0].plot(s, [r["ce"] for r in train], label="train CE")
    if "mtp_loss" in train[0]:
        axes[0].plot(s, [r["mtp_loss"] for r in train], label="MTP loss (x lambda)")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val CE")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats/token")
    axes[0].legend()
    axes[0].set_title("loss")
    if val:
        axes[1].plot([r["step"] for r in val], [r["bpb"] for r in val], "o-", label="val bits/byte")
    axes[1].plot(s, [r["bpb_train"] for r in train], alpha=0.5, label="train bits/byte")
    axes[1].set_xlabel("step")
    axes[1].legend()
    axes[1].set_title("bits per byte")
    if "max_vio_batch" in train[0]:
        axes[2].plot(s, [r["max_vio_batch"] for r in train], label="MaxVio_batch")
    if val and "max_vio_global" in val[0]:
        axes[2].plot([r["step"] for r in val], [r["max_vio_global"] for r in val], "o-", label="MaxVio_global (val)")
    if axes[2].lines:
        axes[2].legend()
    else:  # a dense model (e.g. the scaling experiment's): no experts to balance
        axes[2].text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_xlabel("step")
    axes[2].set_title("expert load imbalance")
    fig.tight_layout()
    p = os.path.join(out_dir, "curves.png")
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    return paths
