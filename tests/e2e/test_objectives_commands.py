"""Each family of objectives (contrastive, inter-view, intra-view) trains together from the
command line, every term logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_HEADS, assert_each_term_logged, run


@pytest.mark.parametrize(("variant", "input_mode"),
                         [("moco", "native"), ("byol", "shared"), ("barlow", "shared")])
def test_cli_runs_the_three_objectives_together(variant, input_mode, tmp_path):
    run_dir = tmp_path / "run"
    run("objective=[inst_disc,dense_id,sim_global]", f"objective.inst_disc.variant={variant}",
        f"input={input_mode}", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
        "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
        "data.batch_size=32", "data.num_workers=0", "export=false", f"hydra.run.dir={run_dir}")
    assert_each_term_logged(run_dir, ("inst_disc", "dense_id", "sim_global"), steps=3)
    assert Path(run_dir / "checkpoints" / "last.ckpt").is_file()


INTER = ["nvs", "sim_pixel", "sim_feat"]


@pytest.mark.parametrize("mode", ["shared", "native"])
def test_inter_objectives_run_together_from_the_command_line(mode, tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=1",
            "backbone.num_heads=2", "data.batch_size=32", "data.num_workers=0",
            "data.source_size=16", "data.labels=false", "data.captions=false",
            "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
            "trainer.devices=1", "export=false", f"input={mode}", f"hydra.run.dir={run_dir}"]
    tiny += [f"objective.{name}.{k}={v}" for name in INTER for k, v in TINY_HEADS[name].items()]
    run("objective=[" + ",".join(INTER) + "]", *tiny)
    assert_each_term_logged(run_dir, INTER, steps=3)


INTRA = ["ae", "mim_pixel", "dense_distill", "global_distill", "mim_global"]


def test_all_intra_objectives_run_together_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=1",
            "backbone.num_heads=2", "data.batch_size=16", "data.num_workers=0",
            "data.source_size=16", "data.labels=false", "data.captions=false",
            "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
            "trainer.devices=1", "export=false", f"hydra.run.dir={run_dir}"]
    objectives = "objective=[" + ",".join(INTRA) + "]"
    run(objectives, *tiny)
    assert_each_term_logged(run_dir, INTRA, steps=3)
