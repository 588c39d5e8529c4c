"""M3I's comparison on the embedded digits, a preset of the ablation command
(``python -m m3i_lightning.ablate``, docs/interplay.md): ``experiment=cpu/m3i`` (M3I's CPU
recipe, the budget of ``cpu/base``: 8 epochs of batch 32), its objectives alone, left out and
together with and without mix, next to the random init of each feature, over seeds 0, 1, 2,
each scored by kNN, the linear probe and the ``finetune`` protocol (the ``cpu`` recipe for
``--finetune-epochs``).

    python scripts/compare_objectives.py --out outputs/compare     # the table of docs/interplay.md
    python scripts/compare_objectives.py --seeds 0 --finetune-epochs 0 --set data=...

The table, plots and run folders are the ablation's, in ``--out``; running it again into the same
folder skips the finished runs. ``--sweeps 2`` runs two pre-training processes at a time, one
thread each, which on 2 cores finishes sooner than one with two threads. (Until #28 this script
ran its own rows, each objective with its own CPU recipe and MoCo v3 beside them; that table, in
docs/results.md, came from ``git show ae1c0a2:scripts/compare_objectives.py``.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PRESET = ["experiment=cpu/m3i", "trainer.enable_progress_bar=false"]


def command(seeds: list[int], finetune_epochs: int, sweeps: int, out: Path,
            extra: list[str]) -> list[str]:
    """The ablation command line of the preset."""
    protocols = "knn,linear" + (",finetune" if finetune_epochs else "")
    finetune = [f"finetune.epochs={finetune_epochs}"] if finetune_epochs else []
    return [sys.executable, "-m", "m3i_lightning.ablate", *PRESET, f"protocols=[{protocols}]",
            *finetune, f"seeds=[{','.join(map(str, seeds))}]", f"ablation.sweeps={sweeps}",
            f"hydra.run.dir={out}", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune-epochs", type=int, default=3,
                        help="epochs of the cpu fine-tuning recipe per run (0: none)")
    parser.add_argument("--sweeps", type=int, default=2, help="pre-training processes at a time")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare_objectives"),
                        help="the ablation folder (a second call skips its finished runs)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of every run (data=..., trainer.max_epochs=...)")
    args = parser.parse_args(argv)
    return subprocess.run(command(args.seeds, args.finetune_epochs, args.sweeps, args.out,
                                  args.set)).returncode


if __name__ == "__main__":
    sys.exit(main())
