"""``python -m m3i_lightning.export``: the export command (:mod:`m3i_lightning.commands.export`)."""

from m3i_lightning.commands.export import main

if __name__ == "__main__":
    main()
