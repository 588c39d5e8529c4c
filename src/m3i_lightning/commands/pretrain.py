"""``python -m m3i_lightning``: pre-train the selected objectives from the Hydra config."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from m3i_lightning.commands.runfolder import (
    FAILED_FILE,
    PICTURES_DIR,
    finish_run,
    holding_run_folder,
    mark_failed,
    run_callbacks,
    untrained,
    write_record,
)
from m3i_lightning.conf import CONF_DIR
from m3i_lightning.config.factory import (
    build_datamodule,
    build_model,
    build_tokenizer_from,
    check_run_data,
    run_seed,
)
from m3i_lightning.config.loggers import TrackerRuns, publish_run, run_loggers
from m3i_lightning.config.restore import check_resumable, image_text_objective
from m3i_lightning.config.schema import check_command_line, parse_overrides
from m3i_lightning.config.start_screen import show_start_screen
from m3i_lightning.config.trainer import (
    build_trainer,
    console_callbacks,
    per_device_batch,
    process_count,
)
from m3i_lightning.core.errors import ConfigError, M3IError, full_trace_wanted, one_line_errors
from m3i_lightning.data.skips import SkipReport
from m3i_lightning.evaluation.protocols import check_eval_options, selected_protocols
from m3i_lightning.runtime.checkpointing import (
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    resume_path,
)
from m3i_lightning.runtime.strategies import build_strategy, check_launch, consolidated

log = logging.getLogger(__name__)


@holding_run_folder
def pretrain(cfg: DictConfig) -> dict:
    """Fit and save ``last.ckpt``; then export, print the eval table and draw the curves
    (:func:`~m3i_lightning.commands.runfolder.finish_run`). Hydra's record of the run is
    written once the checkpoint to resume from, if any, fits the model."""
    out = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(run_seed(cfg), workers=True)
    check_eval_options(cfg.knn, cfg.probe)
    selected_protocols(cfg.protocols, image_text_objective(cfg) is not None)
    tokenizer = build_tokenizer_from(cfg.text)
    datamodule = build_datamodule(cfg.data, tokenizer, batch_size=per_process_batch(cfg))
    model = build_model(cfg, datamodule.num_classes, tokenizer)
    check_run_data(model, datamodule, cfg)
    ckpt_path = resume_path(cfg.resume, out)
    if ckpt_path is not None:
        check_resumable(ckpt_path, model, cfg)
    show_start_screen(cfg, out, model, datamodule)
    trainer = build_trainer(
        cfg, strategy=build_strategy(cfg.strategy, model, cfg.checkpoint),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out,
        logger=run_loggers(cfg, out, resuming=ckpt_path is not None),
        callbacks=[*run_callbacks(cfg, datamodule, out), *console_callbacks(cfg),
                   LastCheckpoint(out / "checkpoints", cfg.checkpoint.every_n_steps),
                   ExactResume(), LearningRateMonitor("step"), SkipReport(),
                   TrackerRuns(cfg, out)],
    )
    check_launch(trainer, HydraConfig.get().mode == RunMode.MULTIRUN)
    write_record(cfg, out)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.global_step == 0:
        untrained(trainer, datamodule, out)
    model = consolidated(trainer, lambda: build_model(cfg, datamodule.num_classes, tokenizer))
    results = {"run_dir": str(out), **finish_run(trainer, model, datamodule, cfg, out)}
    if trainer.is_global_zero:
        publish_run(trainer.loggers, out / PICTURES_DIR, results, trainer.global_step)
        print(f"run folder: {out}")
    return results


def per_process_batch(cfg: DictConfig) -> int | None:
    """Each process's share of ``global_batch_size`` (a recipe's total batch); None without
    one: ``data.batch_size`` is then the per-process batch."""
    if not cfg.get("global_batch_size"):
        return None
    return per_device_batch(cfg.global_batch_size, process_count(cfg))


def check_choices(args: list[str]) -> None:
    """Hydra reports an unknown choice of a config group (``backbone=vit_nope``, a member of
    ``objective=[mim_feat,nope]``) in several lines of its own: name the value and the valid
    choices in one line before Hydra composes the config. Objectives are the registered ones;
    the other groups are the files shipped in ``conf/`` (not checked when the command adds a
    ``hydra.searchpath``, whose folders may hold more)."""
    from m3i_lightning.objectives import OBJECTIVES

    overrides = parse_overrides(args)
    searched = any(o.key_or_group == "hydra.searchpath" for o in overrides)
    for override in overrides:
        group = override.key_or_group
        if override.is_delete() or group.startswith("hydra") or "." in group:
            continue
        if group == "objective":
            choices = sorted(OBJECTIVES)
        elif (CONF_DIR / group).is_dir() and not searched:
            choices = sorted(p.relative_to(CONF_DIR / group).with_suffix("").as_posix()
                             for p in (CONF_DIR / group).rglob("*.yaml"))
        else:
            continue
        values = override.sweep_iterator() if override.is_sweep_override() else [override.value()]
        names = [str(n) for v in values for n in (v if isinstance(v, list) else [v])
                 if n is not None]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise ConfigError(f"unknown {group} choice(s) {unknown}; choose from {choices}")


@dataclass
class SweepOutcome:
    """The jobs of a local multirun so far: how many ran, and each failure's line."""

    jobs: int = 0
    failures: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """A new command in this process: an earlier sweep's jobs are not its own."""
        self.jobs = 0
        self.failures.clear()


SWEEP = SweepOutcome()


def sweep_job(cfg: DictConfig) -> float | None:
    """One job of a multirun: its configuration or data error fails this job alone (reported,
    and written to ``FAILED`` in its folder) and the sweep goes on to the next."""
    hydra_cfg = HydraConfig.get()
    SWEEP.jobs += 1
    try:
        return pretrain(cfg).get("knn_top1")
    except M3IError as err:
        if full_trace_wanted():
            raise
        line = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): {err}"
        SWEEP.failures.append(line)
        mark_failed(cfg, Path(hydra_cfg.runtime.output_dir), str(err))
        print(f"failed: {line}", file=sys.stderr)
        return None


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@one_line_errors
def hydra_main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)
    return pretrain(cfg).get("knn_top1")


@one_line_errors
def main() -> float | None:
    """``python -m m3i_lightning`` / ``m3i-pretrain``: check the objective names, then run;
    a sweep with failed jobs ends with one line counting them and exit code 2."""
    SWEEP.reset()
    check_choices(sys.argv[1:])
    check_command_line("config", sys.argv[1:])
    result = hydra_main()
    if SWEEP.failures:
        raise M3IError(f"{len(SWEEP.failures)} of {SWEEP.jobs} sweep jobs failed (each folder "
                       f"holds {FAILED_FILE}); the first: {SWEEP.failures[0]}")
    return result
