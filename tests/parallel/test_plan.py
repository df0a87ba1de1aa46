"""experiments/plan.py on the tiny preset: the real train step lowers on an abstract 8-device mesh without
allocating, the all-to-all buffers in the lowered program have the shapes the dispatch design says, and the
byte and FLOP accounting matches closed forms."""

import math

import pytest

from deepseek_jax import config, model
from experiments import plan as plan_lib


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_lib.plan("tiny", "fsdp=2,expert=4", seq_len=8, micro_batch=1, global_batch=16, remat="full")


def test_lowered_all_to_all_buffers(tiny_plan):
    cfg = config.preset("tiny")
    n, K, d, P_ep = 8, cfg.num_experts_per_tok, cfg.hidden_size, 4
    # dropless: C = n*K rows per peer; main layers see T = 8 tokens, the MTP module T - 1 = 7
    want = {f"tensor<{P_ep}x{n * K}x{d}xbf16>", f"tensor<{P_ep}x{n * K}xi32>",
            f"tensor<{P_ep}x{(n - 1) * K}x{d}xbf16>", f"tensor<{P_ep}x{(n - 1) * K}xi32>"}
    assert set(tiny_plan["lowered_all_to_all_buffer_types"]) == want


def test_capacity_factor_buffers():
    r = plan_lib.plan("tiny", "expert=4,data=2", seq_len=8, micro_batch=1, global_batch=16, remat="none",
                      ep_capacity_factor=1.25)
    c_main, c_mtp = math.ceil(1.25 * 16 / 4), math.ceil(1.25 * 14 / 4)
    assert {f"tensor<4x{c_main}x64xbf16>", f"tensor<4x{c_mtp}x64xbf16>"} <= set(r["lowered_all_to_all_buffer_types"])
    assert r["all_to_all_bytes_per_step_per_device"]["passes_per_micro_batch"] == 4  # no remat recompute


def test_accounting(tiny_plan):
    cfg = config.preset("tiny")
    b = tiny_plan["bytes_per_device"]
    counts = model.count_params(cfg)
    total_fp32 = 4 * (counts["total"] + counts["mtp"])
    assert total_fp32 / 8 <= b["parameters"] < total_fp32  # sharded, at most 8 ways
    assert b["optimizer_state"] == 2 * b["parameters"] + 4  # Adam mu, nu fp32 sharded like the params; int32 count
    assert b["gradients"] == 2 * b["parameters"]
    # FLOPs/token, written out independently: 6 N_act + L * 6 T H (d_qk + d_v)
    T, H = 8, cfg.num_attention_heads
    want = 6 * counts["activated"] + cfg.num_hidden_layers * 6 * T * H * (cfg.qk_head_dim + cfg.v_head_dim)
    assert tiny_plan["flops_per_token"]["main"] == want
    # per step per device: 3 MoE layers (2 main + 1 MTP) x 6 passes (fwd, bwd, remat) x micro-batches
    a = tiny_plan["all_to_all_bytes_per_step_per_device"]
    n_micro = 16 / 8  # 16 sequences over 8 batch shards, 1 per micro-batch
    assert a["routed_rows_balanced"] == pytest.approx(
        (cfg.num_moe_layers + 1) * 6 * n_micro * 8 * 2 * 64 * 2 * 3 / 4)


def test_abstract_mesh_axis_types_match_the_concrete_mesh():
    # jax >= 0.11 defaults AbstractMesh to Explicit axes (Mesh stays Auto); the plan must lower the program a run
    # compiles, so both meshes must carry the same axis types on every supported jax (compat.abstract_mesh).
    from deepseek_jax import sharding
    spec = "fsdp=2,expert=4"
    assert sharding.abstract_mesh(spec).axis_types == sharding.make_mesh(spec).axis_types
    assert sharding.abstract_mesh(spec).axis_types == sharding.make_mesh(spec).abstract_mesh.axis_types
