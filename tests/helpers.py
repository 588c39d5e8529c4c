"""What the tests share, written once: the tiny models and objectives, config composition, real
batches of the embedded digits, process groups for the 2-process tests, and command-line runs in
a fresh interpreter. Fixtures live in ``conftest.py``; data files on disk in ``data_files.py``."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.conf import CONF_DIR
from m3i_lightning.data import EmbeddedDigits
from m3i_lightning.engine.module import MultiObjective

REPO = Path(__file__).resolve().parents[1]

# --- tiny models --------------------------------------------------------------------------------

TINY_VIT = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                num_heads=2)

# 32 px nets whose last stage is a 4x4 grid of 8 px cells, over an 8x8 patch embedding.
TINY_FAMILIES = {
    "convnext": dict(arch="convnext_atto", img_size=32, patch_size=4, output_stride=8,
                     depths=(1, 1, 1, 1), dims=(16, 16, 24, 32)),
    "swin": dict(arch="swin_tiny_patch4_window7_224", img_size=32, patch_size=4, embed_dim=16,
                 depths=(1, 1), num_heads=(2, 2), window_size=4),
    "resnet": dict(arch="resnet18", img_size=32, layers=(1, 1, 1, 1), channels=(8, 16, 24, 32),
                   stem_width=8),
}


def tiny_backbone(**overrides) -> Backbone:
    """The :data:`TINY_VIT` (16 px, 4 px patches), with ``overrides``."""
    options = {**TINY_VIT, **overrides}
    return Backbone(options.pop("arch"), **options)


def family_backbone(family: str, **overrides) -> Backbone:
    """The 32 px net of ``family`` (:data:`TINY_FAMILIES`), seeded."""
    torch.manual_seed(0)
    options = {**TINY_FAMILIES[family], **overrides}
    return Backbone(options.pop("arch"), **options)


# Tiny heads of all 14 objectives, so a test can build any of them quickly.
TINY_HEADS = {
    "cls": dict(num_classes=10),
    "clip": dict(proj_dim=32, text_width=32, text_layers=1, text_heads=2),
    "mim_feat": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2),
    "ae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "mim_pixel": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "dense_distill": {},
    "global_distill": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
    "mim_global": dict(predictor_dim=32),
    "nvs": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2),
    "sim_pixel": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2),
    "sim_feat": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2),
    "dense_id": dict(hidden_dim=32, out_dim=16, queue_size=32),
    "inst_disc": dict(hidden_dim=32, out_dim=16),
    "sim_global": dict(hidden_dim=32, out_dim=16, num_prototypes=16),
}


def tiny_objective(name: str, tokenizer, backbone: Backbone | None = None, **overrides):
    """Objective ``name`` with the tiny heads of :data:`TINY_HEADS` (``overrides`` win):
    standalone with ``backbone``, else sized for :data:`TINY_VIT` and ready to be put in a
    MultiObjective."""
    from m3i_lightning.config.factory import objective_class

    options = {**TINY_HEADS[name], **overrides}
    if name == "clip":
        options["tokenizer"] = tokenizer
    if backbone is not None:
        options["backbone"] = backbone
    else:
        options.setdefault("embed_dim", TINY_VIT["embed_dim"])
        options.setdefault("grid_size", (4, 4))
        options.setdefault("patch_size", TINY_VIT["patch_size"])
    return objective_class(name, options)(**options)


def tiny_heads(names, backbone: Backbone, tokenizer=None) -> dict:
    """Objectives ``names`` with the tiny heads of :data:`TINY_HEADS`, sized for ``backbone``
    through the factory's context, as a run builds them."""
    from m3i_lightning.config.factory import build_objectives

    context = dict(embed_dim=backbone.embed_dim, grid_size=backbone.grid_size,
                   patch_size=backbone.patch_size, num_classes=10,
                   tokenizer=tokenizer or ByteTokenizer(context_length=16))
    return build_objectives({n: dict(TINY_HEADS[n]) for n in names}, context)


def tiny_multi(tokenizer, names, **engine) -> MultiObjective:
    """A seeded :data:`TINY_VIT` engine over the tiny objectives ``names``."""
    torch.manual_seed(0)
    return MultiObjective(tiny_backbone(), {n: tiny_objective(n, tokenizer) for n in names},
                          **engine)


# --- data and config ----------------------------------------------------------------------------


def digits_module(tokenizer, batch_size: int = 8, img_size: int = 16, **kwargs) -> EmbeddedDigits:
    """The embedded digits at ``img_size``, set up for fitting."""
    dm = EmbeddedDigits(img_size=img_size, source_size=16, batch_size=batch_size, num_workers=0,
                        tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def digits32(batch_size: int, seed: int) -> dict:
    """One training batch of the digits at the :data:`TINY_FAMILIES` size (32 px)."""
    torch.manual_seed(seed)
    dm = digits_module(ByteTokenizer(context_length=16), batch_size=batch_size, img_size=32)
    return next(iter(dm.train_dataloader()))


TINY_CONFIG = [*(f"backbone.{k}={v}" for k, v in TINY_VIT.items()), "data.source_size=16",
               "data.num_workers=0"]


def compose_config(*overrides: str, name: str = "config", tiny: bool = True) -> DictConfig:
    """The Hydra config ``name`` as the command line composes it, at :data:`TINY_VIT` size on
    the digits unless ``tiny`` is false (then exactly as given)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*(TINY_CONFIG if tiny else []), *overrides])


# The command line of a tiny fine-tuning run (python -m m3i_lightning.finetune).
TINY_FINETUNE = [*TINY_CONFIG, "trainer.enable_progress_bar=false"]

CLIP_TINY = ["objective=[clip]", "objective.clip.text_width=32", "objective.clip.proj_dim=32",
             "objective.clip.text_layers=1", "objective.clip.text_heads=2",
             "text.context_length=32"]  # 32 bytes keep the digit's name in every caption


def fit_and_save(cfg: DictConfig, steps: int, path: Path):
    """``steps`` training steps of the run ``cfg`` on one CPU process, saved to ``path`` as
    Lightning saves a checkpoint, with its config (what eval, export and restore read).
    Returns the trained model, its tokenizer and data module."""
    import lightning as L

    from m3i_lightning.config.factory import build_datamodule, build_model, build_tokenizer_from
    from m3i_lightning.config.restore import StoreConfig

    L.seed_everything(0)
    tokenizer = build_tokenizer_from(cfg.text)
    dm = build_datamodule(cfg.data, tokenizer)
    model = build_model(cfg, dm.num_classes, tokenizer)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[StoreConfig(cfg, dm.num_classes)])
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(path)
    return model, tokenizer, dm


# --- learning -------------------------------------------------------------------------------------


def feature_spread(backbone: Backbone, images: torch.Tensor) -> float:
    """Spread across the batch (mean std) of the normalised, mean-pooled patch features: what
    a collapsed encoder drives to 0. A fresh ViT's class token hardly differs between images,
    so it would say little about collapse."""
    with torch.no_grad():
        features = backbone(images).tokens.mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1).std(dim=0).mean().item()


def fit_fixed_batch(objective, batch: dict, steps: int = 30, lr: float = 1e-3):
    """A plain torch loop on one fixed batch (the same mask every step), the teacher and the
    averaged heads following by the engine's own :meth:`update_teacher`. Returns the loss
    curve and the :func:`feature_spread` of view1 before and after."""
    name = next(iter(objective.objectives()))
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=lr)
    start, losses = feature_spread(objective.backbone, batch["view1"]), []
    for step in range(steps):
        torch.manual_seed(0)
        loss = objective.forward_terms(batch)[0][name]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        objective.update_teacher(step, steps)
    return losses, start, feature_spread(objective.backbone, batch["view1"])


def clustered_features(classes: int, dim: int, rows: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` features around ``classes`` random centres (3 apart on average, off the
    origin) and their labels: separable, not trivially."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    labels = torch.randint(classes, (rows,), generator=g)
    return centres[labels] + torch.randn(rows, dim, generator=g) + 5, labels


# --- process groups -------------------------------------------------------------------------------


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_file: str):
    """Inside: this process as ``rank`` of a gloo group met through ``init_file``, on one
    thread (the machine is shared); the group is destroyed on the way out."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def gloo_share(rank: int, world_size: int, init_file: str, batch_size: int):
    """Inside :func:`gloo_group`: yields the rows of a ``batch_size`` batch that are this
    rank's share and the mean over ranks (a DDP gradient reducer), for a run on its share to
    compare with one process on the whole batch."""
    with gloo_group(rank, world_size, init_file) as dist:

        def average(t):
            t = t.clone()
            dist.all_reduce(t)
            return t / world_size

        share = batch_size // world_size
        yield slice(rank * share, (rank + 1) * share), average


# --- command-line runs ----------------------------------------------------------------------------

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


def start(*args: str, scripts: Path, cwd: Path | None = None, prelude: str | None = None,
          module: str = "m3i_lightning", user: int | None = None) -> subprocess.Popen:
    """Start ``python -m <module> *args`` (the pre-training command by default), one thread per
    process (the machine is shared), in a session of its own (a run may kill its process
    group), its output piped. ``prelude``: Python run first in the same process (to inject a
    failure into the pre-training command), from a script file in ``scripts`` so that the
    processes Lightning starts for the other ranks, which re-run the command line, run it
    too. ``user``: the uid (and gid) to run as, through util-linux's ``setpriv`` (a test run
    as root checking permissions)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", module, *args]
    if prelude is not None:
        script = Path(scripts, "pretrain.py")
        script.write_text(
            f"{prelude}\nfrom m3i_lightning.commands.pretrain import main\nmain()\n")
        command = [sys.executable, str(script), *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
        env["HOME"] = str(scripts)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(*args: str, cwd: Path | None = None, prelude: str | None = None,
        check: bool = True, module: str = "m3i_lightning",
        user: int | None = None) -> subprocess.CompletedProcess:
    """:func:`start` the command and wait for it (10 minutes at most)."""
    with tempfile.TemporaryDirectory() as scripts:
        if user is not None:
            os.chmod(scripts, 0o777)  # the prelude script and HOME
        process = start(*args, scripts=Path(scripts), cwd=cwd, prelude=prelude, module=module,
                        user=user)
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


# In-process command runs log nothing to files: Hydra's logging setup off.
QUIET_HYDRA = ["hydra/job_logging=none", "hydra/hydra_logging=none"]


@contextlib.contextmanager
def in_process_command():
    """Around a command run in the test's process: what it leaves behind for the next tests of
    this pytest worker is undone: the variables Lightning sets (MASTER_PORT, PL_GLOBAL_SEED...),
    which the processes those tests start would inherit; torch's thread count, which Lightning
    raises to the cores when OMP_NUM_THREADS is unset (the worker's later fits would then
    compete with the other worker's); and a process group (a one-process FSDP2 run that failed
    after setting it up), which a forked test would inherit."""
    import torch.distributed as dist

    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def fails_with_one_line(capsys, monkeypatch, main, prog: str, *args: str) -> str:
    """Run ``main`` in this process as ``prog *args``: exit code 2, and stderr is the one
    ``error:`` line, which is returned."""
    import pytest

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with in_process_command(), pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    return errors[0]


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
