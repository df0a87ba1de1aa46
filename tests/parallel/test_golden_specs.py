"""The PartitionSpec of every DeepSeek-V3 671B variable on two 2048-device meshes, checked in
(tests/golden/partition_specs_deepseek-v3-671b.json), so a change of the sharding rules or of a parameter's logical
axes shows up in review as a diff of that file. Regenerate after an intended change with

    UPDATE_GOLDEN=1 python -m pytest -q tests/parallel/test_golden_specs.py

Besides the golden comparison, a few specs are asserted by hand from the rules' intent (so the test is not only
"same as last time")."""

import json
import os

import pytest

from deepseek_jax import config
from deepseek_jax import sharding
from deepseek_jax.parallel import step as sharded

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden", "partition_specs_deepseek-v3-671b.json")
MESHES = {
    # the plan's mesh (experiments/plan.py): EP 64 as in the paper, ZeRO-3 over the other 32
    "fsdp32_expert64": {"fsdp": 32, "expert": 64},
    # with 8-way tensor parallelism inside a node
    "fsdp4_expert64_tensor8": {"fsdp": 4, "expert": 64, "tensor": 8},
}


@pytest.fixture(scope="module")
def tables():
    cfg = config.preset("deepseek-v3-671b")
    return {name: sharded.spec_table(cfg, spec) for name, spec in MESHES.items()}


def test_golden_partition_specs(tables):
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:  # one line per variable, so a review diff shows exactly what moved
            f.write("{\n" + ",\n".join(
                f' "{name}": {{\n  "mesh": {json.dumps(t["mesh"])},\n  "variables": {{\n' + ",\n".join(
                    f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in t["variables"].items()) + "\n  }\n }"
                for name, t in tables.items()) + "\n}\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert set(golden) == set(tables)
    for name in tables:
        assert golden[name]["mesh"] == tables[name]["mesh"], name
        want, got = golden[name]["variables"], tables[name]["variables"]
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        assert not missing and not extra, f"{name}: variables missing {missing[:5]}, new {extra[:5]}"
        changed = [f"{k}: {want[k]} -> {got[k]}" for k in want if want[k] != got[k]]
        assert not changed, f"{name}: specs changed (UPDATE_GOLDEN=1 if intended):\n" + "\n".join(changed[:20])


def test_specs_follow_the_rules(tables):
    v = tables["fsdp4_expert64_tensor8"]["variables"]
    # routed experts: [layers, expert, embed, moe_mlp] -> experts over "expert", d over "fsdp", F over "tensor"
    assert v["params/moe_layers/mlp/experts_gate"] == [None, "expert", "fsdp", "tensor"]
    assert v["params/moe_layers/mlp/experts_down"] == [None, "expert", "tensor", "fsdp"]
    # router bias [layers, expert]: sharded like the experts it steers
    assert v["router/moe_layers/mlp/router/bias"] == [None, "expert"]
    # vocab 129280 = 8 * 16160 over tensor, d over fsdp
    assert v["params/embed/embedding"] == ["tensor", "fsdp"]
    assert v["params/lm_head/kernel"] == ["fsdp", "tensor"]
    # norm gains replicated
    assert v["params/final_norm/scale"] == []
    # 128 heads x 192 over tensor
    assert v["params/dense_layers/attn/q_b_proj/kernel"] == [None, "fsdp", "tensor"]
    assert v["params/dense_layers/attn/q_a_proj/kernel"] == [None, "fsdp"]  # "embed" took fsdp first
    p = tables["fsdp32_expert64"]["variables"]
    assert p["params/moe_layers/mlp/experts_up"] == [None, "expert", "fsdp"]
    assert p["params/moe_layers/mlp/router/kernel"] == [None, "fsdp", "expert"]


def test_bad_logical_axis_and_mesh_raise():
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("embed", "heads_typo"), (8, 8), {"tensor": 2})
    with pytest.raises(ValueError, match="unknown axis"):
        sharding.mesh_shape({"data": 2, "model": 4})
    with pytest.raises(ValueError, match="mesh.expert"):
        sharding.mesh_shape("data=2,expert=0")
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 16}, devices=[object()] * 8)
    # not divisible -> unsharded; a mesh axis is used once per array
    assert sharding.logical_to_spec(("vocab", "embed"), (7, 8), {"tensor": 2, "fsdp": 2}) == \
        sharding.P(None, "fsdp")
    assert sharding.logical_to_spec(("mlp", "moe_mlp"), (8, 8), {"tensor": 2}) == sharding.P("tensor")
