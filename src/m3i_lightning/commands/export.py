"""``python -m m3i_lightning.export checkpoint=PATH out=DIR``: a trained checkpoint as an exported
folder (:mod:`m3i_lightning.config.artifacts`)."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError, one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """``python -m m3i_lightning.export checkpoint=PATH out=DIR``."""
    args = OmegaConf.from_cli(sys.argv[1:] if argv is None else argv)
    if not args.get("checkpoint") or not args.get("out"):
        raise ConfigError("usage: python -m m3i_lightning.export checkpoint=PATH out=DIR")
    out = export_model(load_checkpoint(args.checkpoint), args.out)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
