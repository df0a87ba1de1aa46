"""experiments/sweep.py: verdict rules and the power-law fit against hand computations, and a toy experiment
(tiny model, 2 steps, 2 arms x 2 seeds with the seed minimum lowered to 2 to save CI time, in-process) run end to
end: logs copied, tables equal to the means and
sample stds of the logged validation losses, a second sweep skips everything, a changed config is refused as
stale, and RESULTS.md shows verdicts only where >= 3 seeds exist ("not run yet" with the command otherwise)."""

import csv
import json
import math
import os
import statistics
import textwrap

import pytest

from experiments import sweep


def _s(mean, std, n=3):
    return {"mean": mean, "std": std, "n": n}


# --------------------------------------------------------------------------------------------------- verdicts
def test_verdict_less():
    claim = {"id": "x", "a": "A", "b": "B", "expect": "less", "metric": "loss"}
    # d = -0.3, SE = sqrt(2 * 0.1^2 / 3) = 0.0816: |d| > 2 SE
    assert sweep.verdict(claim, {"A": _s(1.0, 0.1), "B": _s(1.3, 0.1)})[0] == "reproduced"
    assert sweep.verdict(claim, {"A": _s(1.3, 0.1), "B": _s(1.0, 0.1)})[0] == "contradicted"
    # d = -0.15 < 2 SE = 0.163: within noise
    assert sweep.verdict(claim, {"A": _s(1.0, 0.1), "B": _s(1.15, 0.1)})[0] == "not at this scale"
    # deterministic metric: any difference decides
    assert sweep.verdict(claim, {"A": _s(288, 0.0), "B": _s(1536, 0.0)})[0] == "reproduced"
    # fewer than 3 seeds on one arm: no verdict
    assert sweep.verdict(claim, {"A": _s(1.0, 0.1, 2), "B": _s(1.3, 0.1)}) is None


def test_verdict_paired_over_common_seeds():
    # A big shared seed effect (1.0, 2.0, 3.0) hides a consistent a - b = -0.1 (+-0.01) from the unpaired SE
    rows = [{"arm": "A", "seed": s, "loss": v - 0.1 + e}
            for s, v, e in ((0, 1.0, 0.01), (1, 2.0, -0.01), (2, 3.0, 0.0))]
    rows += [{"arm": "B", "seed": s, "loss": v} for s, v in ((0, 1.0), (1, 2.0), (2, 3.0))]
    claim = {"id": "p", "a": "A", "b": "B", "expect": "less", "metric": "loss"}
    stats = sweep.arm_stats(rows, "loss")
    assert sweep.verdict(claim, stats)[0] == "not at this scale"  # unpaired: SE ~ 0.82
    v = sweep.verdict(claim, stats, rows)
    # paired: diffs (-0.09, -0.11, -0.10): mean -0.1, SE = 0.01 / sqrt(3)
    assert v[0] == "reproduced" and "paired" in v[2]


def test_verdict_equal_and_rel_within():
    eq = {"id": "e", "a": "A", "b": "B", "expect": "equal", "metric": "loss"}  # default tolerance 1% of B
    # n = 3 per arm (_s), unpaired SE = sqrt(2 s^2 / 3)
    # d = 0.03 within noise (2 SE = 0.082) but the band 0.112 / 2.03 = 5.5% > 1%: the runs cannot tell
    assert sweep.verdict(eq, {"A": _s(2.0, 0.05), "B": _s(2.03, 0.05)})[0] == "not at this scale"
    # d = 0.005, 2 SE = 0.0082: band 0.0132 / 2.005 = 0.66% <= 1%
    assert sweep.verdict(eq, {"A": _s(2.0, 0.005), "B": _s(2.005, 0.005)})[0] == "reproduced"
    assert sweep.verdict(eq, {"A": _s(2.0, 0.01), "B": _s(2.1, 0.01)})[0] == "contradicted"  # 4.8%, 2 SE 0.016
    assert sweep.verdict(dict(eq, tol=0.1), {"A": _s(2.0, 0.01), "B": _s(2.1, 0.01)})[0] == "reproduced"
    rel = {"id": "r", "a": "A", "b": "B", "expect": "rel_within", "tol": 0.0025, "metric": "loss"}
    # d = 0.004, 2 SE = 0.00163: band 0.28% > 0.25%; with std 0.0005 (2 SE 0.00082) the band is 0.24%
    assert sweep.verdict(rel, {"A": _s(2.004, 0.001), "B": _s(2.0, 0.001)})[0] == "not at this scale"
    assert sweep.verdict(rel, {"A": _s(2.004, 0.0005), "B": _s(2.0, 0.0005)})[0] == "reproduced"
    assert sweep.verdict(rel, {"A": _s(2.02, 0.001), "B": _s(2.0, 0.001)})[0] == "contradicted"  # 1%, SE 0.0008
    assert sweep.verdict(rel, {"A": _s(2.02, 0.05), "B": _s(2.0, 0.05)})[0] == "not at this scale"


def test_power_law_fit_and_verdict():
    cs = [1e10, 3e10, 1e11, 1e12]
    rows = [{"arm": f"s{i}", "seed": s, "compute_flops": c, "loss": 7.0 * c ** -0.05 * (1 + 0.001 * (s - 1))}
            for i, c in enumerate(cs) for s in range(3)]
    a, k, r2 = sweep.fit_power_law([r["compute_flops"] for r in rows], [r["loss"] for r in rows])
    # the seed factors (0.999, 1, 1.001) average to ~1 in log space, so the fit recovers a and k
    assert abs(k + 0.05) < 1e-4 and abs(a / 7.0 - 1) < 1e-3 and r2 > 0.99
    claim = {"id": "p", "metric": "loss", "expect": "power_law"}
    stats = sweep.arm_stats(rows, "loss")
    assert sweep.verdict(claim, stats, rows)[0] == "reproduced"
    flat = [dict(r, loss=3.0 + 0.01 * r["seed"]) for r in rows]
    assert sweep.verdict(claim, sweep.arm_stats(flat, "loss"), flat)[0] == "contradicted"  # slope 0


def test_arm_stats_sample_std():
    rows = [{"arm": "a", "loss": v} for v in (1.0, 2.0, 4.0)]
    s = sweep.arm_stats(rows, "loss")["a"]
    assert s["n"] == 3 and math.isclose(s["mean"], 7 / 3)
    assert math.isclose(s["std"], statistics.stdev([1.0, 2.0, 4.0]))


# ---------------------------------------------------------------------------------------------- toy sweep
TOY = '''
"""Toy experiment for tests/test_sweep.py."""
import ml_collections
from experiments.configs import base
from deepseek_jax.train.step import default_train_config

EXPERIMENT = "toy"
SEEDS = (0, 1)
# The arms differ only in logging, so both train with one compiled program (the mechanics are what is tested).
ARMS = {{"a": {{"loop.log_every": 1}}, "b": {{"loop.log_every": 2}}, "c": {{}}}}
CLAIMS = [
    dict(id="ab", metric="loss", a="a", b="b", expect="less", claim="A beats B", paper="1.0 vs 2.0 [toy]"),
    dict(id="ac", metric="loss", a="a", b="c", expect="less", claim="A beats C", paper="1.0 vs 3.0 [toy]"),
    dict(id="ab2", metric="loss", a="a", b="b", expect="less", claim="A beats B again", paper="1.0 vs 2.0 [toy]",
         revision="added for the test"),
]
TOTAL = {total}


def _base():
    c = base.base_config()
    c.model.overrides = ml_collections.ConfigDict(dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, num_nextn_predict_layers=0, moe_dispatch="dense"))
    c.data.corpus = {corpus!r}
    c.data.seq_len, c.data.batch_size, c.data.val_fraction = 16, 2, 0.3
    c.train = default_train_config(total_steps=TOTAL, peak_lr=1e-2, warmup_steps=1)
    c.train.balance.scope = "sequence"
    c.loop.eval_every, c.loop.eval_batches, c.loop.ckpt_every, c.loop.log_every = TOTAL, 1, TOTAL, 1
    c.loop.progress = False
    return c


def get_config(arg="a"):
    cfg = base.experiment_config(EXPERIMENT, ARMS, arg, base=_base())
    cfg.loop.out_dir = {runs!r} + "/" + cfg.loop.out_dir
    return cfg
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(sweep, "MIN_SEEDS", 2)
    root = tmp_path_factory.mktemp("sweep")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)

    def write(total):
        path = root / "toy.py"
        path.write_text(textwrap.dedent(TOY.format(total=total, corpus=str(corpus / "*.txt"),
                                                   runs=str(root / "runs"))))
        return sweep.load_experiment(str(path))

    mod = write(2)
    results = str(root / "results")
    calls = []

    def runner(cfg, cmd, timeout):
        calls.append(cmd)
        sweep.inprocess_runner(cfg, cmd, timeout)

    res = sweep.run_experiment(mod, arms=["a", "b"], results_root=results, runner=runner, log=lambda *a: None)
    yield {"mod": mod, "write": write, "results": results, "res": res, "calls": calls}
    mp.undo()


def test_toy_sweep_runs_and_copies_logs(toy):
    assert sorted(toy["res"]["ran"]) == [(a, s) for a in "ab" for s in range(2)]
    assert len(toy["calls"]) == 4 and "--config=" in toy["calls"][0][3] and toy["calls"][0][3].endswith(":a,seed=0")
    for arm in "ab":
        for seed in range(2):
            rd = sweep.run_dir(toy["results"], "toy", arm, seed)
            assert sorted(os.listdir(rd)) == ["config.json", "metrics.jsonl", "summary.json", "sweep.json",
                                              "validation.jsonl"]
            with open(os.path.join(rd, "config.json")) as f:
                cfg = json.load(f)
            assert cfg["loop.seed"] == seed and cfg["data.seed"] == seed
            assert cfg["loop.log_every"] == (1 if arm == "a" else 2)


def test_toy_tables_match_logged_losses(toy):
    sweep.write_results_md([toy["mod"]], toy["results"])
    finals = {}
    for arm in "ab":
        for seed in range(2):
            with open(os.path.join(sweep.run_dir(toy["results"], "toy", arm, seed), "validation.jsonl")) as f:
                recs = [json.loads(line) for line in f]
            assert recs[-1]["step"] == 2
            finals.setdefault(arm, []).append(recs[-1]["loss"])
    with open(os.path.join(toy["results"], "toy", "arms.csv")) as f:
        arms = {r["arm"]: r for r in csv.DictReader(f)}
    for arm in "ab":
        assert int(arms[arm]["n"]) == 2
        assert math.isclose(float(arms[arm]["loss_mean"]), statistics.mean(finals[arm]), rel_tol=1e-12)
        assert math.isclose(float(arms[arm]["loss_std"]), statistics.stdev(finals[arm]), rel_tol=1e-9)
    assert os.path.getsize(os.path.join(toy["results"], "toy", "curves.png")) > 1000
    md = open(os.path.join(toy["results"], "RESULTS.md")).read()
    row_ab = next(line for line in md.splitlines() if line.startswith("| A beats B"))
    assert any(v in row_ab for v in ("**reproduced**", "**contradicted**", "**not at this scale**"))
    assert f"{statistics.mean(finals['a']):.4f}".rstrip("0")[:5] in row_ab
    row_ac = next(line for line in md.splitlines() if line.startswith("| A beats C"))
    assert "not run yet" in row_ac and "--arms a,c" in row_ac and "'c': 0" in row_ac
    assert "Revised list" not in row_ab
    row_ab2 = next(line for line in md.splitlines() if line.startswith("| A beats B again"))
    assert row_ab2.endswith("Revised list: added for the test |") and row_ab2.split(" | ")[2] == row_ab.split(" | ")[2]


def test_second_sweep_skips_finished_runs(toy):
    def must_not_run(cfg, cmd, timeout):
        raise AssertionError(f"finished run was rerun: {cmd}")

    res = sweep.run_experiment(toy["mod"], arms=["a", "b"], results_root=toy["results"], runner=must_not_run,
                               log=lambda *a: None)
    assert res["ran"] == [] and len(res["skipped"]) == 4


def test_changed_config_is_refused_as_stale(toy):
    changed = toy["write"](3)  # total_steps 2 -> 3: every committed run is now stale
    with pytest.raises(sweep.SweepError, match="stale"):
        sweep.run_experiment(changed, arms=["a"], results_root=toy["results"], runner=None, log=lambda *a: None)
    toy["write"](2)


def test_unknown_experiment_and_arm():
    with pytest.raises(sweep.SweepError, match="unknown experiment"):
        sweep.load_experiment("nonsense")
    mod = sweep.load_experiment("balancing")
    with pytest.raises(sweep.SweepError, match="unknown arm"):
        sweep.run_experiment(mod, arms=["nope"], runner=None)


def test_results_note_runs_trained_with_the_capped_warmup(tmp_path):
    """Runs committed while an explicit warmup was capped at 1% of the run record warmup_steps 3 for a config
    that set 20: RESULTS.md lists them as stale (their config is not what the experiment builds now) and says
    which had the capped warmup."""
    import json
    import types

    from experiments.configs import base
    mod = types.SimpleNamespace(EXPERIMENT="x", ARMS={"a": {}, "b": {}}, CLAIMS=[], SEEDS=(0, 1),
                                get_config=lambda arm: base.base_config(), __doc__="Toy.",
                                __file__=str(tmp_path / "x.py"))
    for arm, seed, warm in (("a", 0, 3), ("a", 1, 20), ("b", 0, 3)):
        d = tmp_path / "x" / "runs" / arm / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"train.optim.warmup_steps": warm}))
        (d / "summary.json").write_text("{}")
    warm = base.base_config().train.optim.warmup_steps
    assert warm == base.WARMUP_STEPS > 20
    assert sweep.capped_warmup_runs(mod, str(tmp_path)) == {(3, warm): ["a/seed0", "b/seed0"],
                                                            (20, warm): ["a/seed1"]}
    assert sweep.stale_runs(mod, str(tmp_path)) == ["a/seed0", "a/seed1", "b/seed0"]
    md = sweep.results_markdown([mod], str(tmp_path))
    assert "Stale runs:** 3 committed runs" in md
    assert f"2 with 3 steps instead of the configured {warm} (a x1, b x1)" in md


def test_unresolvable_arms_serve_only_unresolvable_claims():
    """An arm a sweep leaves out (UNRESOLVABLE_ARMS) must serve no claim the power analysis, from the committed
    pilot, finds resolvable; planned_arms leaves it out unless forced, and SKIP_UNRESOLVABLE leaves out all."""
    mods = [sweep.load_experiment(e) for e in sweep.EXPERIMENTS]
    rows = {(r["experiment"], r["claim"]["id"]): r for r in sweep.power_rows(mods)}
    checked = 0
    for mod in mods:
        for arm in getattr(mod, "UNRESOLVABLE_ARMS", ()):
            assert arm in mod.ARMS
            claims = [c for c in mod.CLAIMS if arm in (c.get("a"), c.get("b"))]
            assert claims, f"{mod.EXPERIMENT}/{arm} serves no claim at all"
            for c in claims:
                r = rows[(mod.EXPERIMENT, c["id"])]
                assert r["needed"] > r["n_run"], f"{mod.EXPERIMENT}/{arm}: claim {c['id']} is resolvable"
            assert arm not in sweep.planned_arms(mod) and arm in sweep.planned_arms(mod, force=True)
            checked += 1
        if getattr(mod, "SKIP_UNRESOLVABLE", False):
            assert sweep.planned_arms(mod) == [] and sweep.planned_arms(mod, force=True) == list(mod.ARMS)
    assert checked >= 1


def test_maxvio_trajectory_table_is_mean_and_sd_per_step(tmp_path):
    """The balancing section's MaxVio_global table: per arm and validation step, the mean and sample std over the
    arm's runs, against statistics on the values written (steps common to all runs only)."""
    import types
    mod = types.SimpleNamespace(EXPERIMENT="x")
    vals = {("a", 0): [0.9, 0.5, 0.2], ("a", 1): [1.1, 0.3, 0.4, 9.9], ("b", 0): [1.0, 2.0, 3.0]}
    for (arm, seed), vs in vals.items():
        d = tmp_path / "x" / "runs" / arm / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "validation.jsonl").write_text("".join(json.dumps({"step": 10 * i, "max_vio_global": v}) + "\n"
                                                    for i, v in enumerate(vs)))
    rows = [{"arm": a, "seed": s} for a, s in vals]
    lines = sweep.maxvio_trajectory_markdown(mod, rows, str(tmp_path))
    assert "| arm | n | step 0 | step 10 | step 20 |" in lines
    row_a = next(ln for ln in lines if ln.startswith("| a |"))
    want = [f"{statistics.mean(p):.3f} ± {statistics.stdev(p):.3f}" for p in ((0.9, 1.1), (0.5, 0.3), (0.2, 0.4))]
    assert row_a == "| a | 2 | " + " | ".join(want) + " |"
    assert next(ln for ln in lines if ln.startswith("| b |")) == "| b | 1 | 1.000 | 2.000 | 3.000 |"
