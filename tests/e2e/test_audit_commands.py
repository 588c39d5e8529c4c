"""The commands of the newcomer audit (#31): evaluation deterministic with bad held-out images
counted, an empty held-out split a warning in training and one line in eval, fine-tuning alike
however the same weights are given, and bad values one ``error:`` line."""

from __future__ import annotations

import json

import pytest
from data_files import image_bytes, labelled_folder, write
from helpers import (
    QUIET_HYDRA,
    TINY_FINETUNE,
    TINY_RUN,
    compose_config,
    fails_with_one_line,
    fit_and_save,
    run,
    tiny_backbone,
)

from m3i_lightning.commands import eval as eval_command
from m3i_lightning.commands import finetune as finetune_command
from m3i_lightning.commands import pretrain as cli
from m3i_lightning.commands.eval import RESULTS_FILE, evaluate_command
from m3i_lightning.commands.finetune import finetune, finetune_top1
from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.restore import TrainedModel, load_checkpoint


def test_eval_counts_unreadable_images_and_gives_the_same_numbers_twice(tmp_path, capsys):
    """Bad held-out and training images are skipped and counted (never swapped for other
    images); ``data.path=<DIR>/train`` scores on the val folder beside it (8 images, not a
    fraction of train); two calls give identical numbers."""
    images = tmp_path / "images"
    labelled_folder(images / "train", 16, captions=False)
    labelled_folder(images / "val", 8, captions=False)
    write(images / "val" / "c00" / "bad.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
    write(images / "val" / "c01" / "cut.png", image_bytes(7, size=(64, 64))[:200])
    write(images / "train" / "c00" / "bad.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
    folder = export_model(TrainedModel(tiny_backbone()), tmp_path / "export")
    args = [f"backbone_dir={folder}", "data=imagefolder", f"data.path={images / 'train'}",
            "data.num_workers=0", "data.batch_size=4", "probe.epochs=3"]
    results = [evaluate_command(compose_config(*args, name="eval", tiny=False),
                                tmp_path / str(i), overrides=args) for i in range(2)]
    assert results[0] == results[1]
    saved = json.loads((tmp_path / "0" / RESULTS_FILE).read_text())
    assert saved["data"]["samples"] == {"train": 16, "val": 8, "train_skipped": 1,
                                        "val_skipped": 2}
    assert "(2 held-out and 1 training samples skipped as unusable)" in capsys.readouterr().out


def test_an_empty_held_out_split_warns_in_training_and_is_one_line_in_eval_and_finetune(
        tmp_path, capsys, monkeypatch):
    done = run(*TINY_RUN, "objective=[cls]", "data.val_fraction=0", "trainer.max_steps=1",
               f"hydra.run.dir={tmp_path / 'run'}")
    output = done.stdout + done.stderr
    assert "end-of-run evaluation skipped: the val split has no labelled image" in output
    assert "data.val_fraction (now 0" in output and "Traceback" not in output
    line = fails_with_one_line(capsys, monkeypatch, eval_command.main, "eval",
                               f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                               f"hydra.run.dir={tmp_path / 'eval'}", *QUIET_HYDRA)
    assert "the val split has no labelled image" in line and "data.val_fraction" in line
    line = fails_with_one_line(capsys, monkeypatch, finetune_command.main, "finetune",
                               *TINY_FINETUNE, "random_init=true", "data.val_fraction=0",
                               f"hydra.run.dir={tmp_path / 'finetune'}", *QUIET_HYDRA)
    assert "the held-out split, which is empty: give data.val_fraction (now 0)" in line


def test_finetuning_the_same_weights_gives_the_same_result_however_they_are_given(tmp_path):
    """checkpoint=, backbone_dir= and the eval command's finetune protocol draw differently
    before the head is built; the head and the run depend on the seed alone. The output
    states the held-out split and its size."""
    checkpoint = tmp_path / "last.ckpt"
    fit_and_save(compose_config("objective=[cls]", "data.batch_size=32"), 2, checkpoint)
    folder = export_model(load_checkpoint(checkpoint), tmp_path / "export")
    recipe = ["finetune.epochs=1", "finetune.eval_every=1", "trainer.enable_progress_bar=false"]
    top1 = {}
    for source in (f"checkpoint={checkpoint}", f"backbone_dir={folder}"):
        out = tmp_path / source.partition("=")[0]
        top1[source] = finetune(compose_config(source, *recipe, name="finetune"), out)["top1"]
        held_out = json.loads((out / "finetune.json").read_text())["held_out"]
        assert held_out["images"] == 359 and "data.val_fraction (now 0.2)" in held_out["split"]
    evaluated = compose_config(f"checkpoint={checkpoint}", *recipe, name="eval")
    top1["protocol"] = finetune_top1(load_checkpoint(checkpoint).backbone, evaluated,
                                     tmp_path / "protocol")
    assert len(set(top1.values())) == 1, top1


ONE_LINE = {  # command line: what its one error line says
    ("objective=[cls,cls]",): "objective=[cls,cls] names ['cls'] more than once",
    ("objective.cls.weight=-1",): "objective.cls.weight=-1 must be a number >= 0",
    ("objective.cls.weight=abc",): "objective.cls.weight=abc must be a number >= 0",
    ("+checkpoint.every_n_step=5",): "did you mean checkpoint.every_n_steps?",
    ("+mask.rattio=0.9",): "did you mean mask.ratio?",
    ("+knn.kk=3",): "did you mean knn.k?",
    ("+foo=1",): "unknown key foo; the keys at the top level",
    ("objective.cls.nope=1",): "unknown key objective.cls.nope",
    ("seed=abc",): "seed=abc must be an integer",
}


@pytest.mark.parametrize("args", list(ONE_LINE), ids=lambda a: a[0])
def test_bad_values_and_keys_are_one_line(args, tmp_path, capsys, monkeypatch):
    line = fails_with_one_line(capsys, monkeypatch, cli.main, "m3i_lightning", *TINY_RUN,
                               "objective=[cls]", *args, f"hydra.run.dir={tmp_path}",
                               *QUIET_HYDRA)
    assert ONE_LINE[args] in line, line
    assert not (tmp_path / "checkpoints").exists()
