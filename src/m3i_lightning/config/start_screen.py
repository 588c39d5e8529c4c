"""What a pre-training run prints before its first step, on rank 0: the resolved config (unless
``print_config=false``), the run folder, each objective with its weight and what it reads, and
the data with its split sizes. One screen to check a run against what was meant before it
spends its budget."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.evaluation.protocols import describe_data

log = logging.getLogger(__name__)


def split_sizes(datamodule) -> dict[str, int]:
    """Samples per split of a map-style data module (its ``splits`` or ``sources``: sequences,
    or listings of ``files``; a module that splits in ``setup``, as the embedded digits do, is
    set up first: Lightning's own call does the same again); empty for a stream, whose size is
    ``num_samples``."""
    if getattr(datamodule, "splits", None) is None:
        datamodule.setup("fit")
    splits = getattr(datamodule, "splits", None) or getattr(datamodule, "sources", None) or {}
    return {name: len(getattr(split, "files", split)) for name, split in splits.items()}


def describe_objectives(model) -> list[str]:
    """One line per objective: its weight and each reading, ``input → target`` (a view, or
    the label / caption it predicts)."""
    objectives = model.objectives()
    width = max(map(len, objectives), default=0)
    lines = []
    for name, objective in objectives.items():
        readings = []
        for reading in model.plan.objectives[name].readings:
            source = reading.input
            seen = f"{'masked ' if source.masked else ''}{source.view}"
            if source.mixed:
                seen += f" (mixed, image {source.mixed})"
            target = reading.target_view or ", ".join(sorted(objective.requires)) or "-"
            readings.append(f"{seen} → {target}")
        lines.append(f"  {name:<{width}}  weight {objective.weight:g}  {'; '.join(readings)}")
    return lines


def describe_split_sizes(datamodule) -> str:
    sizes = split_sizes(datamodule)
    if sizes:
        counted = ", ".join(f"{name} {size:,}" for name, size in sizes.items())
    else:
        counted = f"streamed, {getattr(datamodule, 'num_samples', None) or '?'} samples an epoch"
    classes = f"; {datamodule.num_classes} classes" if datamodule.num_classes else ""
    captions = "; captions" if "text" in datamodule.provides else ""
    return f"{counted}{classes}{captions}"


def start_screen(cfg: DictConfig, out: Path, model, datamodule) -> str:
    """The screen's text.

    Args:
        cfg: the run's config, shown resolved unless ``print_config`` is false.
        out: the run folder.
        model: the built :class:`~m3i_lightning.engine.module.MultiObjective`.
        datamodule: the built data module.
    """
    lines = []
    if cfg.get("print_config", True):
        lines += ["config (print_config=false hides it):",
                  OmegaConf.to_yaml(cfg, resolve=True).rstrip(), ""]
    mode = f"input={model.input_mode}" + (", mix" if model.mix else "")
    lines += [f"run folder: {Path(out).resolve()}",
              f"objectives ({mode}):", *describe_objectives(model),
              f"data: {describe_data(cfg.data)}: {describe_split_sizes(datamodule)}"]
    return "\n".join(lines)


@rank_zero_only
def show_start_screen(cfg: DictConfig, out: Path, model, datamodule) -> None:
    """Print :func:`start_screen` once, from the process of rank 0."""
    print(start_screen(cfg, out, model, datamodule), flush=True)
