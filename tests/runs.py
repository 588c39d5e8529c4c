"""Tiny command-line runs for the scale-out tests: the overrides, the subprocess, the losses."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# A 16 px ViT of depth 1, no validation passes and no export, so a run is mostly its ~10 s of
# imports; COMPOSED selects [mim_feat, clip, cls] with tiny heads.
TINY_RUN = ["backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
            "backbone.img_size=16", "data.source_size=16", "data.num_workers=0",
            "trainer.log_every_n_steps=1", "+trainer.limit_val_batches=0", "export=false",
            "probe.epochs=1"]
COMPOSED = ["objective=[mim_feat,clip,cls]", "objective.clip.text_width=32",
            "objective.clip.proj_dim=32", "objective.clip.text_layers=1",
            "objective.clip.text_heads=2", "objective.mim_feat.predictor_dim=32",
            "objective.mim_feat.predictor_depth=1", "objective.mim_feat.predictor_heads=2"]
TWO_CPU_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2"]


def run(*args: str, cwd: Path | None = None, prelude: str | None = None,
        check: bool = True, module: str = "m3i_lightning") -> subprocess.CompletedProcess:
    """``python -m <module> *args`` (the pre-training command by default), one thread per
    process (the machine is shared), in a session of its own (a run may kill its process
    group). ``prelude``: Python run first in the same process (to inject a failure into the
    pre-training command), from a script file so that the processes Lightning starts for the
    other ranks, which re-run the command line, run it too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    with tempfile.TemporaryDirectory() as scripts:
        command = [sys.executable, "-m", module, *args]
        if prelude is not None:
            script = Path(scripts, "pretrain.py")
            script.write_text(f"{prelude}\nfrom m3i_lightning.commands.pretrain import main\nmain()\n")
            command = [sys.executable, str(script), *args]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600, start_new_session=True)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Step → logged value of ``key`` in the run's ``metrics.csv``."""
    with open(Path(run_dir) / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def assert_each_term_logged(run_dir: Path, names, steps: int) -> None:
    """Every objective's ``train/loss/<name>`` column of the run holds ``steps`` finite values."""
    with open(Path(run_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in names:
        values = [float(r[f"train/loss/{name}"]) for r in rows if r.get(f"train/loss/{name}")]
        assert len(values) == steps and all(math.isfinite(v) for v in values), (name, values)


# A fresh interpreter that imports only torch and timm loads each folder both documented ways.
TIMM_ONLY = """
import json, sys, timm, torch
for folder in sys.argv[1:]:
    spec = json.load(open(f"{folder}/config.json"))
    x = torch.load(f"{folder}/input.pt")
    by_file = timm.create_model(spec["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors"),
                                **spec["model_args"]).eval()
    by_dir = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.save(torch.stack([by_file(x), by_dir(x)]), f"{folder}/timm_features.pt")
assert "m3i_lightning" not in sys.modules
"""


@contextlib.contextmanager
def gloo_share(rank: int, world_size: int, init_file: str, batch_size: int):
    """Inside: this process as ``rank`` of a gloo group; yields the rows of a ``batch_size``
    batch that are its share and the mean over ranks (a DDP gradient reducer), for a run on
    its share to compare with one process on the whole batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)

    def average(t):
        t = t.clone()
        dist.all_reduce(t)
        return t / world_size

    share = batch_size // world_size
    try:
        yield slice(rank * share, (rank + 1) * share), average
    finally:
        dist.destroy_process_group()
