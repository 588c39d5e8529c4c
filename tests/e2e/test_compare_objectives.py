"""scripts/compare_objectives.py, a preset of the ablation command: the command line it gives,
the ablation it composes (every compared configuration beside the random init read by its
feature) and its exit code. The ablation itself runs end to end in test_ablate.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers import REPO
from hydra import compose, initialize_config_dir

from m3i_lightning.commands.ablate import plan_rows
from m3i_lightning.conf import CONF_DIR

SCRIPT = REPO / "scripts" / "compare_objectives.py"


def load_script():
    spec = importlib.util.spec_from_file_location("m3i_compare_objectives", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composed(line: list[str]):
    """The ablation config of a command line of the preset (its overrides)."""
    assert line[1:3] == ["-m", "m3i_lightning.ablate"]
    overrides = [o for o in line[3:] if not o.startswith("hydra.")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("ablate", overrides=overrides)


def test_the_preset_is_m3is_ablation_with_every_untrained_twin():
    """M3I's CPU recipe, three seeds, kNN, linear probe and 3 epochs of fine-tuning; its rows:
    the random init of both features, each objective alone and left out, M3I with and
    without mix, each trained row read by a feature that has its random-init row."""
    cfg = composed(load_script().command([0, 1, 2], 3, 2, Path("out"), []))
    assert list(cfg.seeds) == [0, 1, 2] and cfg.ablation.sweeps == 2
    assert list(cfg.protocols) == ["knn", "linear", "finetune"] and cfg.finetune.epochs == 3
    assert cfg.trainer.max_epochs == 8 and cfg.global_batch_size == 32 and cfg.mix
    rows = plan_rows(cfg)
    randoms = {r.feature for r in rows if r.kind == "random"}
    assert randoms == {"class token", "mean-pooled"}
    assert all(r.feature in randoms and not r.untrained for r in rows if r.kind != "random")
    assert [r.label for r in rows if r.kind == "full"] == ["full (mix)", "full w/o mix"]
    assert {r.objectives for r in rows if r.kind == "single"} == {
        ("mim_feat",), ("sim_feat",), ("cls",)}


def test_no_finetune_column_and_extra_overrides():
    line = load_script().command([0], 0, 1, Path("out"), ["data.batch_size=64"])
    cfg = composed(line)
    assert list(cfg.protocols) == ["knn", "linear"] and list(cfg.seeds) == [0]
    assert line[-2:] == ["hydra.run.dir=out", "data.batch_size=64"]


def test_the_exit_code_and_error_line_are_the_ablations(tmp_path, capfd):
    assert load_script().main(["--seeds", "0", "--out", str(tmp_path),
                               "--set", "objective=[cls]"]) == 2
    assert "error: an ablation needs a composition of two or more objectives" in \
        capfd.readouterr().err
