"""``python -m m3i_lightning.eval``: the evaluation command (:mod:`m3i_lightning.commands.eval`)."""

from m3i_lightning.commands.eval import main

if __name__ == "__main__":
    main()
