"""``python -m m3i_lightning.finetune checkpoint=PATH | backbone_dir=DIR | random_init=true``:
fine-tune a pre-trained backbone on a labelled data set (``data=...``, as for pre-training)
with a recipe of ``conf/finetune/``; writes best and last checkpoints and ``finetune.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from pathlib import Path

import hydra
import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import IterableDataset

from m3i_lightning.backbone import Backbone
from m3i_lightning.commands.command_line import run_with_arguments
from m3i_lightning.conf import CONF_DIR
from m3i_lightning.config.factory import build_datamodule, run_seed
from m3i_lightning.config.finetune_source import finetuning_backbone, load_source, transfer
from m3i_lightning.config.loggers import TrackerRuns, publish_run, run_loggers
from m3i_lightning.config.trainer import per_device_batch, process_count, trainer_kwargs
from m3i_lightning.core.errors import ConfigError, EmptySplitError, one_line_errors
from m3i_lightning.core.shares import split_loader
from m3i_lightning.data.module import held_out_options
from m3i_lightning.evaluation.protocols import describe_data
from m3i_lightning.finetune.augment import RecipeView
from m3i_lightning.finetune.module import Classifier, FineTuning, Recipe
from m3i_lightning.runtime.checkpointing import AtomicCheckpointIO, LastCheckpoint
from m3i_lightning.runtime.pictures import PICTURES_DIR
from m3i_lightning.runtime.strategies import build_strategy

RESULTS_FILE = "finetune.json"
CONFIG_KEY = "m3i_finetune_config"
STRATEGIES = ("auto", "ddp", "fsdp")
TRAIN_FIELDS = {"view1", "label"}


class FineTuningData(L.LightningDataModule):
    """A pre-training data module serving fine-tuning batches: its training images (through
    the recipe's :class:`~m3i_lightning.finetune.augment.RecipeView`, which ``data`` is built
    with), with labels, and its held-out split as every rank's equal share
    (:mod:`m3i_lightning.core.shares`)."""

    def __init__(self, data) -> None:
        super().__init__()
        self.data = data

    def setup(self, stage: str) -> None:
        if hasattr(self.data, "setup"):
            self.data.setup(stage)

    def train_dataloader(self):
        return self.data.train_dataloader()

    def val_dataloader(self):
        return split_loader(self.data, "val")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Refuse unlabelled training images while the labels are still on the host (no
        device sync): cross-entropy would silently ignore them."""
        if self.trainer.training and (batch["label"] < 0).any():
            missing = int((batch["label"] < 0).sum())
            raise ConfigError(f"fine-tuning needs a label for every training image: {missing} "
                              f"of a batch of {len(batch['label'])} have none")
        return batch


class StoreFineTuningConfig(L.Callback):
    """The resolved fine-tuning config in every checkpoint, under its own key (these are not
    pre-training checkpoints)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def check_held_out(data, held_out: str) -> None:
    """Refuse an empty held-out split before training (a stream's is known only once read):
    fine-tuning is scored on it. ``held_out``: the options that supply it."""
    if hasattr(data, "setup"):
        data.setup("fit")  # the embedded digits are split here
    dataset = split_loader(data, "val").dataset
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise EmptySplitError(f"fine-tuning is scored on the held-out split, which is empty: "
                              f"give {held_out}")


def recipe_from(cfg: DictConfig, global_batch: int) -> Recipe:
    """The optimisation recipe; ``lr: null`` takes MAE's rule lr = blr · batch / 256."""
    r = cfg.finetune
    lr = r.lr if r.lr is not None else r.blr * global_batch / 256
    return Recipe(lr=lr, layer_decay=r.layer_decay, weight_decay=r.weight_decay,
                  betas=tuple(r.betas), warmup_epochs=r.warmup_epochs, min_lr=r.min_lr,
                  mixup=r.mixup, cutmix=r.cutmix, smoothing=r.smoothing, ema=r.ema)


def build_classifier(cfg: DictConfig, num_classes: int,
                     pretrained: tuple[Backbone, str] | None = None) -> tuple[Classifier, str]:
    """``backbone=`` with the pre-trained weights of exactly one source, and its name;
    ``pretrained``: a backbone in memory and its name (the eval command's ``finetune``
    protocol), whose own architecture is then fine-tuned. Each way of giving the weights draws
    differently from the random generators, so they are seeded again before the head is
    built: the head, and the run after it, depend on the run's seed alone."""
    r = cfg.finetune
    if pretrained is not None:
        source, name = pretrained
        spec = {"arch": source.arch, "img_size": source.img_size, **source.timm_kwargs}
        backbone = finetuning_backbone(spec, r.drop_path, r.global_pool)
        transfer(source, backbone, name)
    else:
        sources = [bool(cfg.checkpoint), bool(cfg.backbone_dir), bool(cfg.random_init)]
        if sum(sources) != 1:
            raise ConfigError("give exactly one of checkpoint=PATH (a pre-training checkpoint), "
                              "backbone_dir=DIR (an exported folder) or random_init=true (the "
                              "from-scratch baseline)")
        backbone = finetuning_backbone(OmegaConf.to_container(cfg.backbone, resolve=True),
                                       r.drop_path, r.global_pool)
        name = "random_init"
        if not cfg.random_init:
            source, name = load_source(cfg.checkpoint, cfg.backbone_dir)
            transfer(source, backbone, name)
    L.seed_everything(run_seed(cfg), workers=True, verbose=False)
    return Classifier(backbone, num_classes), name


def finetune(cfg: DictConfig, out: Path, pretrained: tuple[Backbone, str] | None = None) -> dict:
    """Fit, validate the last weights once more, and write ``finetune.json`` (rank 0);
    ``pretrained``: see :func:`build_classifier`."""
    if cfg.strategy.name not in STRATEGIES:
        raise ConfigError(f"fine-tuning runs with strategy= one of {STRATEGIES}, not "
                          f"'{cfg.strategy.name}'")
    L.seed_everything(run_seed(cfg), workers=True, verbose=False)
    r = cfg.finetune
    recipe_view = functools.partial(
        RecipeView, crop_scale=r.crop_scale, hflip=r.hflip, auto_augment=r.auto_augment,
        reprob=r.reprob, remode=r.remode, interpolation=r.interpolation)
    data = build_datamodule(cfg.data, None, TRAIN_FIELDS,
                            batch_size=per_device_batch(r.batch_size, process_count(cfg)),
                            train_view=recipe_view)
    if "label" not in data.provides:
        raise ConfigError(f"fine-tuning needs labels: data '{cfg.data.name}' provides none")
    datamodule = FineTuningData(data)
    held_out = held_out_options(data)
    check_held_out(data, held_out)
    classifier, source = build_classifier(cfg, data.num_classes, pretrained)
    checkpoints = out / "checkpoints"
    best = ModelCheckpoint(checkpoints, filename="best", monitor="val/top1", mode="max",
                           enable_version_counter=False)
    trainer = L.Trainer(**trainer_kwargs(cfg), default_root_dir=out,
                        strategy=build_strategy(cfg.strategy, None),
                        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
                        logger=run_loggers(cfg, out),
                        callbacks=[best, LastCheckpoint(checkpoints), StoreFineTuningConfig(cfg),
                                   TrackerRuns(cfg, out), LearningRateMonitor("step")])
    model = FineTuning(classifier, recipe_from(cfg, r.batch_size))
    trainer.fit(model, datamodule=datamodule)
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)
    last = validated[0] if validated else {}
    if "val/top1" not in last:  # a stream's held-out split, which had no sample
        raise EmptySplitError(f"fine-tuning scored no held-out image: give {held_out}")
    results = {"top1": last["val/top1"], "top5": last["val/top5"],
               **{k.removeprefix("val/"): v for k, v in last.items() if "ema_top" in k}}
    results["best_top1"] = keep_best(best, checkpoints / "last.ckpt", results["top1"],
                                     trainer.is_global_zero)
    if trainer.is_global_zero:
        scored = {"data": describe_data(cfg.data), "split": held_out,
                  "images": int(last["val/images"])}
        summary = {"source": source, "run_dir": str(out), "results": results,
                   "held_out": scored,
                   "epochs": trainer.current_epoch, "steps": trainer.global_step,
                   "lr": model.recipe.lr, "checkpoints": {"best": str(checkpoints / "best.ckpt"),
                                                          "last": str(checkpoints / "last.ckpt")},
                   "finetune": OmegaConf.to_container(r, resolve=True)}
        (out / RESULTS_FILE).write_text(json.dumps(summary, indent=2))
        publish_run(trainer.loggers, out / PICTURES_DIR, results, trainer.global_step)
        print(f"top-1 {100 * results['top1']:.2f}%  top-5 {100 * results['top5']:.2f}%  "
              f"(best top-1 {100 * results['best_top1']:.2f}%) on {scored['images']} held-out "
              f"images of {scored['data']}: {held_out}")
        print(f"results: {out / RESULTS_FILE}")
    return results


def finetune_config(cfg: DictConfig, img_size: int) -> DictConfig:
    """The fine-tuning command's config with the recipe, data and seed of ``cfg``. It runs on
    one device: the end of a training run evaluates on rank 0 alone."""
    scope = (contextlib.nullcontext() if GlobalHydra.instance().is_initialized()
             else initialize_config_dir(str(CONF_DIR), version_base="1.3"))
    with scope:
        composed = compose("finetune")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    composed.data = {**data, "img_size": img_size}
    composed.finetune = OmegaConf.to_container(cfg.finetune, resolve=True)
    composed.seed = cfg.seed
    composed.trainer.devices = 1
    return composed


def finetune_top1(backbone: Backbone, cfg: DictConfig, out_dir: Path) -> float:
    """Fine-tune a copy of ``backbone`` (its weights stay as they are) in ``out_dir``."""
    composed = finetune_config(cfg, backbone.img_size[0])
    return finetune(composed, Path(out_dir), (backbone, "the evaluated model"))["top1"]


def keep_best(best: ModelCheckpoint, last: Path, last_top1: float, writer: bool) -> float:
    """The best top-1 over the evaluations during training and the final one of the last
    weights (which training validates only when the last epoch is a multiple of
    ``eval_every``); ``best.ckpt`` becomes ``last.ckpt`` when the final one is the best."""
    score = float("-inf") if best.best_model_score is None else float(best.best_model_score)
    if last_top1 <= score:
        return score
    if writer:
        shutil.copyfile(last, Path(best.dirpath) / "best.ckpt")
    return last_top1


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
@one_line_errors
def finetune_app(cfg: DictConfig) -> None:
    finetune(cfg, Path(HydraConfig.get().runtime.output_dir))


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """The finetune command on the command line's overrides, or on ``argv`` from Python."""
    run_with_arguments(finetune_app, argv, "finetune")
