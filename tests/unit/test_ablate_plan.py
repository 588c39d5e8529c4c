"""The ablation command's plan and table (commands/ablate.py), without running a job: the rows
of a composition, each job's config, the command line its sweep is given (the SLURM launcher
included) and the table's arithmetic on planted results."""

from __future__ import annotations

import json

import pytest
from helpers import compose_config
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from m3i_lightning.commands.ablate import (
    Row,
    forwarded_overrides,
    job_key,
    markdown,
    plan_rows,
    row_config,
    summarize_ablation,
)
from m3i_lightning.conf import CONF_DIR
from m3i_lightning.core.errors import ConfigError


def test_the_rows_of_m3i_each_read_by_its_feature():
    """experiment=cpu/m3i mixes: every row reads the mean-pooled feature but the composition
    without mix, whose cls trains the class token; one random init per feature."""
    rows = {r.key: r for r in plan_rows(compose_config("experiment=cpu/m3i", tiny=False))}
    assert list(rows) == ["random-mean_pooled", "random-class_token", "only-mim_feat",
                          "only-sim_feat", "only-cls", "without-mim_feat", "without-sim_feat",
                          "without-cls", "full", "full-nomix"]
    assert rows["without-cls"].objectives == ("mim_feat", "sim_feat")
    assert rows["full-nomix"].mix is False and rows["full-nomix"].feature == "class token"
    assert {rows[k].feature for k in rows if k != "full-nomix" and "class" not in k} == {
        "mean-pooled"}
    assert rows["random-class_token"].untrained and rows["random-class_token"].mix is False


def test_two_objectives_have_no_leave_one_out_row_and_may_gain_a_mix_twin():
    """[cls, mim_feat] without mix: each alone, together, and together with mix (it can mix);
    mim_feat alone trains no class token, so it pools the tokens."""
    rows = {r.key: r for r in plan_rows(compose_config("objective=[cls,mim_feat]"))}
    assert set(rows) == {"random-class_token", "random-mean_pooled", "only-cls",
                         "only-mim_feat", "full", "full-mix"}
    assert rows["only-mim_feat"].feature == "mean-pooled"
    assert rows["only-cls"].feature == rows["full"].feature == "class token"
    assert rows["full-mix"].mix is True


def test_a_job_config_keeps_only_its_objectives_and_their_options():
    cfg = compose(["objective=[mim_feat,cls]", "objective.cls.label_smoothing=0.2"])
    job = row_config(cfg, Row("only-cls", "cls", "single", ("cls",), untrained=True), 3)
    assert list(job.objective) == ["cls"] and job.objective.cls.label_smoothing == 0.2
    assert job.seed == 3 and job.data.seed == 3 and job.trainer.max_steps == 0
    assert "seeds" not in job and "ablation" not in job
    with pytest.raises(ConfigError, match=r"two or more objectives; objective=\['cls'\]"):
        plan_rows(compose(["objective=[cls]"]))


def test_weighting_rows_run_the_full_composition_under_each_other_strategy():
    """ablation.weightings adds the full composition under each strategy but the run's own;
    the job of such a row trains with that strategy; an unknown name is one error."""
    cfg = compose(["objective=[mim_feat,cls]", "ablation.weightings=[fixed,uncertainty,pcgrad]"])
    rows = {r.key: r for r in plan_rows(cfg)}
    assert {k for k in rows if k.startswith("full")} == {"full", "full-mix", "full-uncertainty",
                                                         "full-pcgrad"}
    assert rows["full-pcgrad"].objectives == ("mim_feat", "cls") and rows["full"].weighting is None
    assert row_config(cfg, rows["full-uncertainty"], 1).weighting == "uncertainty"
    assert row_config(cfg, rows["full"], 1).weighting == "fixed"
    with pytest.raises(ConfigError, match=r"unknown \['gradnorm'\]; choose among"):
        plan_rows(compose(["objective=[mim_feat,cls]", "ablation.weightings=[gradnorm]"]))


def compose(overrides: list[str], **kwargs):
    """The ablation command's config, as its command line composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("ablate", overrides=overrides, **kwargs)


def test_the_slurm_launcher_composes_and_reaches_the_jobs_sweep():
    """hydra/launcher=slurm (hydra-submitit-launcher, the cluster extra) composes with the
    ablation config, and the sweep of its jobs is given it, without the command's own keys."""
    cfg = compose(["experiment=cpu/m3i", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                   "seeds=[0,1]", "ablation.sweeps=1"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.nodes == 1
    task = ["experiment=cpu/m3i", "seeds=[0,1]", "ablation.sweeps=1", "data.batch_size=64"]
    hydra_overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                       "hydra.run.dir=abl"]
    assert forwarded_overrides(task, hydra_overrides) == [
        "experiment=cpu/m3i", "data.batch_size=64", "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu"]


def plant(runs, key: str, results: dict | None = None, failed: str | None = None,
          interplay: dict | None = None) -> None:
    folder = runs / key
    folder.mkdir(parents=True)
    if results is not None:
        (folder / "eval.json").write_text(json.dumps({"results": results}))
    if failed is not None:
        (folder / "FAILED").write_text(failed)
    if interplay is not None:
        (folder / "interplay.json").write_text(json.dumps(interplay))


def test_the_table_of_planted_results(tmp_path):
    """Gains over the random init of the row's feature, marginal contributions (full minus
    the composition without the objective), the composition's gain over the best single
    objective, failures and the interplay summary, over two seeds."""
    rows = [Row("random-t", "random init (class token)", "random", ("a",), None, True,
                "class token"),
            Row("only-a", "a", "single", ("a",), feature="class token"),
            Row("only-b", "b", "single", ("b",), feature="class token"),
            Row("full", "full", "full", ("a", "b"), feature="class token")]
    linear = {"random-t": [0.30, 0.34], "only-a": [0.50, 0.54], "only-b": [0.60, 0.70],
              "full": [0.80, 0.70]}
    interplay = {"summary": {"steps": [9, 19], "cos": {"a-b": {"mean": -0.2, "first": -0.3,
                                                               "last": -0.1}},
                             "share": {"a": 0.25, "b": 0.75}, "norm": {"a": 1.0, "b": 3.0},
                             "cos_sum": {"a": 0.1, "b": 0.9}}, "wrt": "encoder"}
    for row in rows:
        for seed, value in enumerate(linear[row.key]):
            plant(tmp_path, job_key(row, seed), {"linear_top1": value},
                  interplay=interplay if row.kind == "full" else None)
    plant(tmp_path, job_key(rows[1], 2), failed="error: optim.lr=-1 must be a number > 0")
    summary = summarize_ablation(rows, [0, 1, 2], tmp_path)
    table = summary["rows"]
    assert table["only-b"]["gain_over_random"]["linear_top1"] == pytest.approx(0.65 - 0.32)
    assert summary["marginal"]["a"]["linear_top1"] == pytest.approx(0.75 - 0.65)
    assert summary["marginal"]["b"]["linear_top1"] == pytest.approx(0.75 - 0.52)
    assert summary["composition"]["linear_top1"]["best_single"] == "b"
    assert summary["composition"]["linear_top1"]["gain"] == pytest.approx(0.10)
    assert table["only-a"]["failed"] == {2: "error: optim.lr=-1 must be a number > 0"}
    assert table["full"]["failed"] == {2: "not run"}
    assert summary["interplay"]["cos"]["a-b"]["mean"] == -0.2
    text = markdown(summary, "2 steps")
    assert "| a | a | class token | 52.0 ± 2.8 (2 of 3) | +20.0 |" in text
    assert "- a, seed 2: error: optim.lr=-1 must be a number > 0" in text
    assert "| a-b | -0.200 | -0.300 | -0.100 |" in text
