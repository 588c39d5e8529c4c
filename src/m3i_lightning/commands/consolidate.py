"""``m3i-consolidate checkpoint=SRC out=DST`` (``python -m m3i_lightning.consolidate``): a
sharded checkpoint (``checkpoint.sharded=true``) as one consolidated file, the checkpoint every
other command reads, on one process without GPUs. Evaluation and export also read a sharded
folder directly; the file is for moving a model elsewhere, or tools that expect one file. A
Hydra app like the other commands (conf/consolidate.yaml); it writes the file and nothing
else."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from m3i_lightning.commands.command_line import run_with_arguments
from m3i_lightning.core.errors import ConfigError, one_line_errors
from m3i_lightning.runtime.checkpointing import AtomicCheckpointIO, read_checkpoint
from m3i_lightning.runtime.sharded_checkpoint import is_sharded


def consolidate(source, destination, overwrite: bool = False) -> Path:
    """Write the checkpoint at ``source`` (a sharded folder or a file) as one file at
    ``destination``, atomically. An existing ``destination`` (another run's ``last.ckpt``, say)
    is replaced only with ``overwrite``; a folder never is."""
    destination = Path(destination)
    if destination.is_dir() and not is_sharded(destination):
        raise ConfigError(f"out={destination} is a folder: give the path of the file to write")
    if (destination.exists() or destination.is_symlink()) and not overwrite:
        raise ConfigError(f"out={destination} already exists: give a new path, or "
                          "overwrite=true to replace it")
    AtomicCheckpointIO().save_checkpoint(read_checkpoint(source, "checkpoint"), destination)
    return destination


@hydra.main(config_path="../conf", config_name="consolidate", version_base="1.3")
@one_line_errors
def consolidate_app(cfg: DictConfig) -> None:
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("usage: python -m m3i_lightning.consolidate checkpoint=SRC out=DST")
    print(f"consolidated into {consolidate(cfg.checkpoint, cfg.out, cfg.overwrite)}")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """The consolidate command on the command line's overrides, or on ``argv`` from Python."""
    run_with_arguments(consolidate_app, argv, "consolidate")


if __name__ == "__main__":
    main()
