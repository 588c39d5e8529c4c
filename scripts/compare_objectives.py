"""Pre-train every objective of the unified table, and M3I with and without mix, on the embedded
digits under the same budget, then print one table: objective, input, target, distribution
form, kNN top-1 on the held-out split and wall time.

    python scripts/compare_objectives.py --epochs 10            # the README table
    python scripts/compare_objectives.py --only cls mim_feat    # a subset

Each run is a separate ``python -m m3i_lightning`` process with ``input=native`` (each objective
with its reference input), the default CPU ViT and its default CPU-sized heads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from m3i_lightning.objectives import OBJECTIVES

# backbone=vit_cpu brings the CPU-sized heads of conf/scale/cpu.yaml to the recipe too.
M3I = ["experiment=m3i", "backbone=vit_cpu", "global_batch_size=128"]


def runs() -> list[tuple[str, list[str]]]:
    """(row label, overrides) for every row of the comparison."""
    rows = []
    for name, family in OBJECTIVES.items():
        if family.variants:
            rows += [(f"{name} ({v})", [f"objective=[{name}]", "input=native",
                                        f"objective.{name}.variant={v}"])
                     for v in family.variants]
        else:
            rows.append((name, [f"objective=[{name}]", "input=native"]))
    rows.append(("[mim_feat,clip,cls] shared", ["objective=[mim_feat,clip,cls]"]))
    rows.append(("M3I (mix)", M3I))
    rows.append(("M3I w/o mix", [*M3I, "mix=false"]))
    return rows


def describe(label: str) -> tuple[str, str, str]:
    """Input, target and distribution form of a row, read from the objective classes."""
    name = label.split()[0]
    if name not in OBJECTIVES:
        shared = "masked view1 (A+B mixed)" if "mix)" in label else "masked view1"
        return shared, "per objective", "Gaussian + Boltzmann"
    obj = OBJECTIVES[name]
    if obj.variants:
        obj = obj.variants[label.split("(")[1].rstrip(")")]
    source = ("masked " if obj.masked_input else "") + obj.input_view
    target = obj.target_repr + (f" of {obj.target_view}" if obj.target_view else "")
    return source, target, obj.form


def knn_of(run_dir: Path) -> float | None:
    """kNN top-1 the run wrote to its ``eval.json``."""
    report = run_dir / "eval.json"
    if not report.exists():
        return None
    return json.loads(report.read_text())["results"].get("knn_top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="row labels starting with these names")
    parser.add_argument("--out", type=Path, default=Path("compare_objectives.json"))
    args = parser.parse_args()
    selected = [(label, o) for label, o in runs()
                if not args.only or any(label.startswith(p) for p in args.only)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(selected):
            run_dir = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "m3i_lightning", *overrides,
                   f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={run_dir}"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode:
                print(f"{label}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            knn = knn_of(run_dir) if proc.returncode == 0 else None
            source, target, form = describe(label)
            results.append({"objective": label, "input": source, "target": target,
                            "form": form, "knn_top1": knn, "seconds": round(seconds, 1)})
            print(f"done {label}: kNN {knn}", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{len(selected)} runs, {args.epochs} epochs each on the embedded digits "
          "(default CPU ViT), kNN k=20 on the held-out split\n")
    print("| objective | input | target | form | kNN top-1 | wall time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        knn = "failed" if r["knn_top1"] is None else f"{100 * r['knn_top1']:.1f}%"
        print(f"| {r['objective']} | {r['input']} | {r['target']} | {r['form']} | {knn} "
              f"| {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
