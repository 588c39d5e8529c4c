"""``m3i-export checkpoint=PATH out=DIR`` (``python -m m3i_lightning.export``): a trained
checkpoint as an exported folder (:mod:`m3i_lightning.config.artifacts`) with its model card
(:mod:`m3i_lightning.config.model_card`), uploaded to the Hugging Face Hub with
``push_to_hub=<org>/<name>`` (:mod:`m3i_lightning.config.hub`). A Hydra app like the other
commands (conf/export.yaml); it writes the folder and nothing else."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from m3i_lightning.commands.command_line import run_with_arguments
from m3i_lightning.commands.eval import RESULTS_FILE
from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.hub import push_folder
from m3i_lightning.config.model_card import write_model_card
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError, one_line_errors


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@one_line_errors
def export_app(cfg: DictConfig) -> None:
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("usage: python -m m3i_lightning.export checkpoint=PATH out=DIR")
    trained = load_checkpoint(cfg.checkpoint)
    out = export_model(trained, cfg.out)
    write_model_card(out, trained.config, evaluation_of(cfg.checkpoint), cfg.push_to_hub)
    print(f"exported to {out}")
    if cfg.push_to_hub:
        print(f"pushed to {push_folder(out, cfg.push_to_hub, cfg.private)}")


def evaluation_of(checkpoint: str) -> Path | None:
    """The ``eval.json`` that scored ``checkpoint``: the end-of-run evaluation of its run
    folder (the checkpoint's folder or the one above it), written after the checkpoint (a
    later resume makes it stale); None otherwise."""
    path = Path(checkpoint)
    for folder in path.parents[:2]:
        record = folder / RESULTS_FILE
        if record.is_file():
            return record if record.stat().st_mtime >= path.lstat().st_mtime else None
    return None


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """The export command on the command line's overrides, or on ``argv`` from Python."""
    run_with_arguments(export_app, argv, "export")


if __name__ == "__main__":
    main()
