"""``python -m m3i_lightning.consolidate``: one file from a sharded checkpoint
(:mod:`m3i_lightning.commands.consolidate`)."""

from m3i_lightning.commands.consolidate import main

if __name__ == "__main__":
    main()
