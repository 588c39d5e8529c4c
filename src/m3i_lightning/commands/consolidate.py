"""``python -m m3i_lightning.consolidate checkpoint=SRC out=DST``: a sharded checkpoint
(``checkpoint.sharded=true``) as one consolidated file, the checkpoint every other command
reads, on one process without GPUs. Evaluation and export also read a sharded folder directly;
the file is for moving a model elsewhere, or tools that expect one file."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from m3i_lightning.core.errors import ConfigError, one_line_errors
from m3i_lightning.runtime.checkpointing import AtomicCheckpointIO, read_checkpoint


def consolidate(source, destination) -> Path:
    """Write the checkpoint at ``source`` (a sharded folder or a file) as one file at
    ``destination``, atomically."""
    destination = Path(destination)
    AtomicCheckpointIO().save_checkpoint(read_checkpoint(source, "checkpoint"), destination)
    return destination


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = OmegaConf.from_cli(sys.argv[1:] if argv is None else argv)
    if not args.get("checkpoint") or not args.get("out"):
        raise ConfigError("usage: python -m m3i_lightning.consolidate checkpoint=SRC out=DST")
    print(f"consolidated into {consolidate(args.checkpoint, args.out)}")


if __name__ == "__main__":
    main()
