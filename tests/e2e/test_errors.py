"""Every user-facing failure of a command is one ``error:`` line on stderr with exit code 2, and
``HYDRA_FULL_ERROR=1`` still shows the whole traceback.

The commands run in this process through their entry points (``main``), as the console scripts
call them, with Hydra's logging setup off; two real subprocesses check what a shell sees.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUIET_HYDRA, TINY_RUN, fails_with_one_line, run

from m3i_lightning.commands import eval as eval_command
from m3i_lightning.commands import export as export_command
from m3i_lightning.commands import pretrain as cli
from m3i_lightning.core.errors import ConfigError

TINY_CLS = [*TINY_RUN, "objective=[cls]", "data.batch_size=32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real two-step run's checkpoint, and bad files beside it."""
    root = tmp_path_factory.mktemp("files")
    run(*TINY_CLS, "trainer.max_steps=2", f"hydra.run.dir={root / 'run'}")
    good = root / "run" / "checkpoints" / "last.ckpt"
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[:4096])
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": collections.OrderedDict(), "callable": print}, root / "pickle.ckpt")
    (root / "a_file").write_text("")
    return {"root": root, "run": root / "run", "good": good,
            "truncated": root / "truncated.ckpt", "notes": root / "notes.ckpt",
            "pickle": root / "pickle.ckpt", "a_file": root / "a_file"}


def eval_fails(capsys, monkeypatch, tmp_path, *args: str) -> str:
    return fails_with_one_line(capsys, monkeypatch, eval_command.main, "eval", *args,
                               f"hydra.run.dir={tmp_path / 'eval'}", *QUIET_HYDRA)


def train_fails(capsys, monkeypatch, run_dir: Path, *args: str) -> str:
    return fails_with_one_line(capsys, monkeypatch, cli.main, "m3i_lightning", *TINY_CLS,
                               "trainer.max_steps=1", *args, f"hydra.run.dir={run_dir}",
                               *QUIET_HYDRA)


def test_bad_checkpoint_files_given_to_eval_and_export(files, tmp_path, capsys, monkeypatch):
    line = eval_fails(capsys, monkeypatch, tmp_path, f"checkpoint={tmp_path / 'missing.ckpt'}")
    assert "missing.ckpt: no such file" in line
    line = eval_fails(capsys, monkeypatch, tmp_path, f"checkpoint={files['run']}")
    assert "is a folder" in line and f"checkpoint={files['good']}" in line
    for bad in ("truncated", "notes"):
        line = eval_fails(capsys, monkeypatch, tmp_path, f"checkpoint={files[bad]}")
        assert f"checkpoint={files[bad]} cannot be read as a checkpoint (truncated" in line
    line = eval_fails(capsys, monkeypatch, tmp_path, f"checkpoint={files['pickle']}")
    assert "not a checkpoint this library wrote or trusts" in line
    assert "weights_only" not in line  # torch's advice to turn the safe loader off is not given
    line = eval_fails(capsys, monkeypatch, tmp_path, f"backbone_dir={files['run']}")
    assert "holds no config.json" in line

    out = tmp_path / "exported"
    for bad, expected in (("missing", "no such file"), ("truncated", "cannot be read"),
                          ("pickle", "wrote or trusts")):
        path = files.get(bad, tmp_path / "missing.ckpt")
        line = fails_with_one_line(capsys, monkeypatch, export_command.main, "export",
                                   f"checkpoint={path}", f"out={out}")
        assert expected in line
    line = fails_with_one_line(capsys, monkeypatch, export_command.main, "export", f"out={out}")
    assert "checkpoint=PATH out=DIR" in line
    assert not out.exists()  # nothing exported from a bad checkpoint
    line = fails_with_one_line(capsys, monkeypatch, export_command.main, "export",
                               f"checkpoint={files['good']}", f"out={files['a_file']}/sub")
    assert f"cannot write the exported model to {files['a_file']}/sub" in line


BAD_VALUES = {
    "optim.lr=-1e-3": "optim.lr=-0.001 must be a number > 0",
    "optim.lr=abc": "optim.lr=abc must be a number > 0",
    "optim.betas=[0.9,1.5]": "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)",
    "optim.warmup_fraction=2": "optim.warmup_fraction=2 must be a number in [0, 1]",
    "data.batch_size=0": "data.batch_size=0 must be an integer >= 1",
    "data.val_fraction=1": "data.val_fraction=1 must be a number in [0, 1)",
    "data.crop_scale=[0.5,2]": "data.crop_scale=[0.5, 2] must be [min, max]",
    "knn.k=0": "knn.k=0 must be an integer >= 1",
    "probe.epochs=0": "probe.epochs=0 must be an integer >= 1",
    "trainer.precision=bogus": "trainer options: Precision 'bogus' is invalid",
}


def test_bad_resume_files_and_bad_option_values(files, tmp_path, capsys, monkeypatch):
    for bad, expected in (("truncated", "cannot be read as a checkpoint"),
                          ("pickle", "not a checkpoint this library wrote or trusts")):
        line = train_fails(capsys, monkeypatch, tmp_path / bad, f"resume={files[bad]}")
        assert f"resume={files[bad]}" in line and expected in line
        assert not (tmp_path / bad / "checkpoints").exists()
    for option, expected in BAD_VALUES.items():
        assert expected in train_fails(capsys, monkeypatch, tmp_path / "bad", option), option
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_frozen_teacher_given_a_pickle_is_refused_in_one_line(files, tmp_path, capsys,
                                                              monkeypatch):
    line = train_fails(capsys, monkeypatch, tmp_path / "teacher", "objective=[mim_feat]",
                       "teacher.kind=frozen", f"teacher.checkpoint={files['pickle']}")
    assert "teacher.checkpoint=" in line and "wrote or trusts" in line


def test_a_shell_sees_one_line_and_hydra_full_error_shows_the_trace(files, tmp_path,
                                                                    monkeypatch):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "m3i_lightning.eval",
                           f"checkpoint={files['truncated']}", f"hydra.run.dir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the error itself propagates, trace and all
    for main, args in ((eval_command.main, [f"hydra.run.dir={tmp_path}", *QUIET_HYDRA]),
                       (export_command.main, [f"out={tmp_path / 'out'}"])):
        monkeypatch.setattr(sys, "argv", ["prog", f"checkpoint={files['truncated']}", *args])
        with pytest.raises(ConfigError, match="cannot be read as a checkpoint"):
            main()


def test_no_training_batch_fails_and_exports_nothing(tmp_path, capsys, monkeypatch):
    """1,438 training digits and a batch of 4,000 with drop_last: no step can run."""
    run_dir = tmp_path / "run"
    line = train_fails(capsys, monkeypatch, run_dir, "data.batch_size=4000", "export=true")
    assert "no training step ran" in line and "1438 samples" in line
    assert "data.batch_size=4000" in line and "drop_last=True" in line
    assert not (run_dir / "backbone").exists() and not (run_dir / "eval.json").exists()
    assert not (run_dir / "checkpoints").exists()


def test_a_run_folder_with_checkpoints_is_not_overwritten(files, tmp_path, capsys,
                                                          monkeypatch):
    before = {p.name: p.read_bytes() for p in (files["run"] / "checkpoints").iterdir()}
    metrics = (files["run"] / "metrics.csv").read_text()
    line = train_fails(capsys, monkeypatch, files["run"])
    assert f"the run folder {files['run']} already holds checkpoints/last.ckpt" in line
    assert "resume=auto" in line and "overwrite=true" in line
    assert {p.name: p.read_bytes() for p in (files["run"] / "checkpoints").iterdir()} == before
    assert (files["run"] / "metrics.csv").read_text() == metrics


def test_zero_steps_write_the_initial_checkpoint_and_metrics(tmp_path):
    """trainer.max_steps=0, the random-init baseline: last.ckpt (step 0, evaluable) and
    metrics.csv are written like any run's."""
    done = run(*TINY_CLS, "trainer.max_steps=0", f"hydra.run.dir={tmp_path}")
    assert "no training step; last.ckpt holds the initial weights" in done.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 0 and "m3i_config" in checkpoint
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,step", "0,0"]
    assert "kNN top-1" in done.stdout


MIM_FEAT = "objective=[mim_feat]"
ENGINE_VALUES = {
    ("mask.ratio=0", MIM_FEAT): "error: mask.ratio=0 hides 0 of 16 patches",
    ("mask.ratio=1", MIM_FEAT): "error: mask.ratio=1 must be a number in [0, 1)",
    ("mask.ratio=1.5", MIM_FEAT): "error: mask.ratio=1.5 must be a number in [0, 1)",
    ("mask.ratio=-0.5", MIM_FEAT): "error: mask.ratio=-0.5 must be a number in [0, 1)",
    ("mask.ratio=abc", MIM_FEAT): "error: mask.ratio=abc must be a number in [0, 1)",
    ("mask.ratio=0.25", "mix=true", MIM_FEAT): "error: mask.ratio=0.25 with mix=true: mixing",
    ("mask.kind=nope", MIM_FEAT):
        "error: mask.kind=nope must be one of ['attention', 'block', 'random']",
    ("mask.kind=attention", "mix=true", MIM_FEAT):
        "error: mask.kind=attention draws each image's mask from its own teacher attention; "
        "M3I's mix (mix=true) draws the two images' masks together: use mask.kind=random or "
        "mask.kind=block with the mix",
    ("input=sideways",): "error: input=sideways must be one of ['shared', 'native']",
    ("mix=true", "input=native", MIM_FEAT):
        "error: mix=true mixes two images into the one shared input: it needs input=shared",
    (MIM_FEAT, "objective.mim_feat.predictor=linear", "backbone.mask_token=true", "mix=true"):
        "error: objective.mim_feat.predictor=linear reads the encoder's outputs at each "
        "image's masked cells, where mix=true encodes the partner image's patches: use "
        "mix=false or objective.mim_feat.predictor=transformer",
    (MIM_FEAT, "objective.mim_feat.target_blocks=3"):
        "error: objective.mim_feat.target_blocks=3 averages that many of the teacher's last "
        "blocks, but 'vit_tiny_patch16_224' has 1: choose at most 1",
    (MIM_FEAT, "objective.mim_feat.target_blocks=-1"):
        "error: objective.mim_feat.target_blocks=-1 must be an integer >= 0",
    ("objective=[sim_feat]", "objective.sim_feat.correlation_momentum=1.5"):
        "error: objective.sim_feat.correlation_momentum=1.5 must be in [0, 1)",
    ("data.batch_size=1", "objective=[inst_disc]"):
        "error: objective 'inst_disc' needs a per-process batch of at least 2 (negatives / "
        "BatchNorm across the batch), got data.batch_size=1",
    ("data.batch_size=1", "objective=[clip]"): "'clip' needs a per-process batch of at least 2",
    ("+optim.bogus=1",):
        "unknown key optim.bogus (did you mean optim.betas?); the keys under optim",
}


def test_engine_values_that_cannot_work_are_one_line(tmp_path, capsys, monkeypatch):
    """What the engine and the objectives refuse at build or at setup (mask, input, mix,
    data2vec's targets, a batch of one for contrastive and BatchNorm heads, unknown optimiser
    keys) reaches the user as one line naming the options by their key paths, as set on the
    command line (the Python API names the parameters: tests/unit/test_engine.py)."""
    for args, expected in ENGINE_VALUES.items():
        line = train_fails(capsys, monkeypatch, tmp_path / "engine", *args)
        assert expected in line, (args, line)
    assert not (tmp_path / "engine" / "checkpoints").exists()


def test_a_frozen_teacher_wider_than_its_heads_is_one_line(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from m3i_lightning.backbone import Backbone

    wide = Backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=1,
                    num_heads=2)
    save_file(wide.model.state_dict(), tmp_path / "wide.safetensors")
    line = train_fails(capsys, monkeypatch, tmp_path / "wide", "objective=[global_distill]",
                       "teacher.kind=frozen", f"teacher.checkpoint={tmp_path / 'wide.safetensors'}",
                       "teacher.arch=vit_tiny_patch16_224",
                       "teacher.model_args={img_size: 16, patch_size: 4, embed_dim: 48, depth: 1, "
                       "num_heads: 2}")
    assert "48 wide" in line and "['global_distill']" in line and "target_dim" in line


def test_unknown_config_group_choices_are_one_line_with_the_choices(capsys, monkeypatch):
    for args, expected in ((["backbone=vit_nope"], "unknown backbone choice(s) ['vit_nope']"),
                           (["data=nope"],
                            "'embedded', 'hf', 'imagefolder', 'torchvision', 'webdataset'"),
                           (["-m", "experiment=mae,maee"], "unknown experiment choice(s)"),
                           (["experiment=cpu/nope"], "'cpu/base', 'cpu/m3i', 'cpu/mim_feat'"),
                           (["objective=[mim_feat,nope]"], "['nope']; choose from ['ae'")):
        line = fails_with_one_line(capsys, monkeypatch, cli.main, "m3i_lightning", *args)
        assert expected in line, line
