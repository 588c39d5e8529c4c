"""``python -m m3i_lightning.ablate``: the ablation of a composition
(:mod:`m3i_lightning.commands.ablate`)."""

from m3i_lightning.commands.ablate import main

if __name__ == "__main__":
    main()
