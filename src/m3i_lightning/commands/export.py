"""``m3i-export checkpoint=PATH out=DIR`` (``python -m m3i_lightning.export``): a trained
checkpoint as an exported folder (:mod:`m3i_lightning.config.artifacts`). A Hydra app like the
other commands (conf/export.yaml); it writes the folder and nothing else."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from m3i_lightning.commands.command_line import run_with_arguments
from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError, one_line_errors


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@one_line_errors
def export_app(cfg: DictConfig) -> None:
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("usage: python -m m3i_lightning.export checkpoint=PATH out=DIR")
    out = export_model(load_checkpoint(cfg.checkpoint), cfg.out)
    print(f"exported to {out}")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """The export command on the command line's overrides, or on ``argv`` from Python."""
    run_with_arguments(export_app, argv, "export")


if __name__ == "__main__":
    main()
