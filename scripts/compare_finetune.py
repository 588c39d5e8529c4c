"""Fine-tuning from a pre-trained checkpoint against the same architecture from random init,
with the same recipe and budget, over several seeds: the transfer that pre-training buys.

    python scripts/compare_finetune.py --pretrain-epochs 10          # pre-train, then compare
    python scripts/compare_finetune.py --checkpoint RUN/checkpoints/last.ckpt
    python scripts/compare_finetune.py --checkpoint ... -- finetune.epochs=20   # recipe overrides

Every run is its own ``python -m m3i_lightning.finetune`` process (the recipe of
``conf/finetune/cpu.yaml`` unless overridden); prints held-out top-1 mean ± std per arm and
writes ``compare_finetune.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pretrain(epochs: int, out: Path) -> Path:
    """The default pre-training (``python -m m3i_lightning``) for ``epochs`` epochs."""
    run_dir = out / "pretrain"
    subprocess.run([sys.executable, "-m", "m3i_lightning", f"trainer.max_epochs={epochs}",
                    "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], check=True)
    return run_dir / "checkpoints" / "last.ckpt"


def finetune(source: str, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "m3i_lightning.finetune", source, f"seed={seed}",
                    "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
                    *overrides], check=True)
    results = json.loads((run_dir / "finetune.json").read_text())["results"]
    return {**results, "seconds": time.perf_counter() - start}


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a pre-training checkpoint (else --pretrain-epochs)")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="fine-tuning overrides, after --")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="compare_finetune_"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else pretrain(args.pretrain_epochs, out)
    arms = {"pre-trained": f"checkpoint={checkpoint}", "random init": "random_init=true"}
    runs = {arm: [finetune(source, seed, out / f"{arm.replace(' ', '_')}-{seed}", args.overrides)
                  for seed in args.seeds]
            for arm, source in arms.items()}
    report = {"checkpoint": str(checkpoint), "seeds": args.seeds, "overrides": args.overrides,
              "runs": runs}
    (out / "compare_finetune.json").write_text(json.dumps(report, indent=2))
    print(f"| init | held-out top-1 (%), mean ± std over seeds {args.seeds} | top-5 (%) |")
    print("|---|---|---|")
    for arm, results in runs.items():
        print(f"| {arm} | {summary([r['top1'] for r in results])} "
              f"| {summary([r['top5'] for r in results])} |")
    print(f"results: {out / 'compare_finetune.json'}")


if __name__ == "__main__":
    main()
