"""Every command of the README's Tour runs as written: read from the README itself, pointed at
data this test makes (an image folder, shards, a Hugging Face dataset), at the tiny model size
and for one step. A README edit that breaks a command breaks this test.

The commands run in this process as ``python -m`` runs them (``runpy`` with the module's
``__main__``), so that the Tour pays the imports once instead of once per command; what a shell
sees of a command is tested in fresh processes elsewhere (test_cli, test_errors)."""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from data_files import labelled_folder, make_shards
from helpers import QUIET_HYDRA, REPO, in_process_command

pytestmark = pytest.mark.tour

README = REPO / "README.md"
TINY = ["++backbone.img_size=16", "++backbone.patch_size=4", "++backbone.embed_dim=32",
        "++backbone.depth=1", "++backbone.num_heads=2", "data.num_workers=0", "trainer.max_steps=1",
        "global_batch_size=8", "probe.epochs=1", "trainer.enable_progress_bar=false"]


def tour_commands() -> list[list[str]]:
    """The ``python -m ...`` lines of the Tour's code block, comments removed, split as a
    shell would."""
    text = README.read_text()
    block = re.search(r"## Tour\n.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("python -m")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    import datasets

    root = tmp_path_factory.mktemp("tour")
    folder = labelled_folder(root / "imagenet" / "train", 16, classes=2)
    labelled_folder(root / "imagenet" / "val", 4, classes=2)
    make_shards(folder, root / "shards", 8)
    rows = {"image": [str(p) for p in sorted(folder.rglob("*.png"))]}
    rows["caption"] = [f"image {i}" for i in range(len(rows["image"]))]
    rows["label"] = [i % 2 for i in range(len(rows["image"]))]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "hf"))
    return {"/data/imagenet": str(root / "imagenet"),
            "shards/{000000..000127}.tar": str(root / "shards" / "{000000..000001}.tar"),
            "./my_dataset": str(root / "hf")}


def pointed_at(args: list[str], data: dict[str, str], checkpoint: Path, out: Path) -> list[str]:
    """The command's arguments with the README's example paths replaced by real ones."""
    replaced = []
    for arg in args:
        for example, path in data.items():
            arg = arg.replace(example, path)
        arg = re.sub(r"^checkpoint=.*last\.ckpt$", f"checkpoint={checkpoint}", arg)
        arg = re.sub(r"^out=.*", f"out={out / 'exported'}", arg)
        replaced.append(arg)
    return replaced


def test_every_tour_command_runs_as_written(data, tmp_path, monkeypatch, capfd):
    commands = tour_commands()
    modules = {args[0] for args in commands}
    assert {"m3i_lightning", "m3i_lightning.eval", "m3i_lightning.export"} <= modules
    assert len(commands) >= 10
    checkpoint = tmp_path / "run0" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    for number, (module, *args) in enumerate(commands):
        args = pointed_at(args, data, checkpoint, tmp_path)
        if module == "m3i_lightning":
            args += [*TINY, f"hydra.run.dir={tmp_path / f'run{number}'}",
                     f"hydra.sweep.dir={tmp_path / f'sweep{number}'}"]
        elif module == "m3i_lightning.eval":
            args += ["data.num_workers=0", "probe.epochs=1",
                     f"hydra.run.dir={tmp_path / f'eval{number}'}"]
        monkeypatch.setattr(sys, "argv", [module, *args, *QUIET_HYDRA])
        try:
            with in_process_command():
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            assert exit_.code in (0, None), (module, args, capfd.readouterr().err[-3000:])
        assert "Traceback" not in capfd.readouterr().err, (module, args)
    assert checkpoint.is_file() and (tmp_path / "exported" / "model.safetensors").is_file()
