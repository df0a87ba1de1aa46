"""How far FP8 and BF16 gradients are from FP32 on the CPU base model (one batch, at initialisation).

    python experiments/fp8_grad_error.py

The model of experiments/configs/base.py (vocab 259: byte tokens), random init, one batch of 4 x 128 random byte
tokens, next-token CE of the main head. Gradients of every parameter under: fp32 (reference), bf16 compute, bf16
compute + FP8 (ModelConfig.fp8, XLA path), fp32 compute + FP8. Per parameter: ||g - g_fp32|| / ||g_fp32||;
reported as the median over parameters and the largest few. Context for the FP8-vs-BF16 training gap
(fp8_train_gap.py): E4M3 rounds each operand with ~3.6% RMS relative error, so a GEMM on random-init (incoherent)
data is ~4-5% off, and the errors compound through the layers. Writes experiments/results/fp8/grad_error.{json,md}.
"""

from __future__ import annotations

import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import config  # noqa: E402
from deepseek_jax import model as model_lib  # noqa: E402
from experiments.configs.base import BASE_MODEL  # noqa: E402
from experiments.fp8_common import provenance, provenance_md, write_json, write_text  # noqa: E402


def main():
    t0 = time.time()
    cfg0 = config.preset("small", **BASE_MODEL, vocab_size=259, eos_token_id=257, bos_token_id=None)
    variables = model_lib.init(cfg0, jax.random.PRNGKey(0), seq_len=8)
    tok = jax.random.randint(jax.random.PRNGKey(1), (4, 129), 0, 256)

    def loss(params, cfg):
        out = model_lib.Transformer(cfg).apply({"params": params, "router": variables["router"]}, tok[:, :-1])
        lp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        return -jnp.take_along_axis(lp, tok[:, 1:, None], -1).mean()

    arms = {"fp32": cfg0, "bf16": cfg0.replace(dtype="bfloat16"),
            "bf16+fp8": cfg0.replace(dtype="bfloat16", fp8=True), "fp32+fp8": cfg0.replace(fp8=True)}
    grads, losses = {}, {}
    for name, c in arms.items():
        val, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], c)
        losses[name] = float(val)
        grads[name] = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
                       for p, x in jax.tree_util.tree_leaves_with_path(g)}
        print(name, losses[name], flush=True)
    ref = grads["fp32"]
    res = {}
    for name in ("bf16", "bf16+fp8", "fp32+fp8"):
        errs = {k: float(np.linalg.norm(grads[name][k] - ref[k]) / (np.linalg.norm(ref[k]) + 1e-30)) for k in ref}
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
        res[name] = dict(loss=losses[name], median_rel_grad_err=float(np.median(list(errs.values()))),
                         worst=worst, per_param=errs)
    prov = provenance()
    write_json("grad_error.json", dict(description=__doc__.split("\n\n")[1].strip(), loss_fp32=losses["fp32"],
                                       arms=res, wall_s=round(time.time() - t0, 1), provenance=prov))
    lines = ["# Gradient error vs FP32: BF16 and FP8 (CPU base model, one batch at init)\n", provenance_md(prov),
             "\nPer parameter ||g - g_fp32|| / ||g_fp32||; median over the model's parameters and the worst ones.\n",
             "| arm | median | worst parameters |", "|---|---|---|"]
    for name, r in res.items():
        worst = ", ".join(f"{k.replace(chr(39), '')} {v:.1%}" for k, v in r["worst"][:3])
        lines.append(f"| {name} | {r['median_rel_grad_err']:.2%} | {worst} |")
    write_text("grad_error.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
