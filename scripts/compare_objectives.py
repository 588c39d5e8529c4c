"""Pre-train objectives of the unified table, and M3I with and without mix, on the embedded digits
under one budget, next to the same architecture left at random init, over several seeds; print
one table of kNN, linear-probe and (optionally) fine-tuning top-1 on the held-out split as
mean ± std over the seeds.

    python scripts/compare_objectives.py                        # the table of docs/results.md
    python scripts/compare_objectives.py --rows all --seeds 0   # every row of the unified table
    python scripts/compare_objectives.py --only M3I random      # rows starting with these names
    python scripts/compare_objectives.py --finetune-epochs 0    # no fine-tuning column

Each pre-training is a separate ``python -m m3i_lightning`` process running the row's CPU recipe
(``conf/experiment/cpu/``: the CPU ViT and heads, the budget, the row's tuned values), each
objective on its reference input (``input=native``); the random-init rows are the same commands
with ``trainer.max_steps=0``. Each run's end-of-run evaluation scores it: kNN, linear probe and the
``finetune`` protocol (the ``cpu`` fine-tuning recipe for ``--finetune-epochs``). ``--jobs 2``
runs two processes at a time with one thread each, which on 2 cores finishes sooner than one
process with two threads.
``--curves PNG`` plots the online kNN / linear probe over training of M3I and of the best
single objective (the first seed, whose runs alone probe online).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from m3i_lightning.objectives import OBJECTIVES

# Every row runs a CPU recipe of conf/experiment/cpu/: the budget of cpu/base (8 epochs of batch
# 32, 360 optimizer steps, the CPU ViT and heads) and the values tuned for the row at that budget,
# each with what it was chosen against. A row of the table without a recipe of its own runs
# cpu/base with its objective; M3I is experiment=m3i under that budget.
BASE = "experiment=cpu/base"
BASE_RECIPE = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "cpu" / "base.yaml"
RECIPES = {"inst_disc (moco)": "experiment=cpu/mocov3", "mim_feat": "experiment=cpu/mim_feat"}
M3I = ["experiment=cpu/m3i"]
UNTRAINED = "trainer.max_steps=0"
# The default rows: M3I's three objectives alone (mim_feat intra-view, sim_feat inter-view, cls)
# and the strongest global self-supervised objective of the 4-epoch table (MoCo v3), then M3I;
# --rows all: the whole table and M3I without mix.
DEFAULT_ROWS = ("cls", "mim_feat", "sim_feat", "inst_disc (moco)")
FEATURES = {"token": "class token", "avg": "mean-pooled"}  # timm global_pool → row feature
PROTOCOLS = {"knn_top1": "kNN", "linear_top1": "linear probe", "finetune_top1": "fine-tune"}


def table_rows() -> list[tuple[str, list[str]]]:
    """(label, overrides) of every objective of the unified table (each variant its own row)."""
    rows = []
    for name, family in OBJECTIVES.items():
        if family.variants:
            rows += [(f"{name} ({v})", [f"objective=[{name}]", "input=native",
                                        f"objective.{name}.variant={v}"])
                     for v in family.variants]
        else:
            rows.append((name, [f"objective=[{name}]", "input=native"]))
    return rows


def runs(which: str) -> list[tuple[str, list[str]]]:
    """The random-init baselines of the two global features a run is read by (the class token;
    the mean of the tokens, which M3I's mix and the token-only objectives train), the objective
    rows, then M3I."""
    objectives = [(label, [RECIPES[label]] if label in RECIPES else [BASE, *o])
                  for label, o in table_rows() if which == "all" or label in DEFAULT_ROWS]
    return [("random init (class token)", [BASE, "objective=[cls]", UNTRAINED]),
            ("random init (mean-pooled)", [*M3I, UNTRAINED]),
            *objectives,
            ("M3I (mix)", M3I),
            *([("M3I w/o mix", [*M3I, "mix=false"])] if which == "all" else [])]


def online_probes(first_seed: bool, every: int) -> list[str]:
    """The online kNN / linear probe every ``every`` epochs (the points of ``--curves``) in the
    runs of the first seed, which the curves plot; none in the others, which only their
    end-of-run evaluation scores."""
    if first_seed:
        return [f"trainer.check_val_every_n_epoch={every}"]
    return ["+trainer.limit_val_batches=0"]


def run(cmd: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def pretrain_and_evaluate(label: str, overrides: list[str], seed: int, epochs: int | None,
                          finetune_epochs: int, run_dir: Path, threads: int,
                          shared: list[str]) -> dict:
    """One row at one seed: pre-train, then the run's own end-of-run evaluation (kNN, linear
    probe and, with ``finetune_epochs``, the ``finetune`` protocol on the trained backbone).
    A failed run keeps its error instead of values."""
    start = time.perf_counter()
    protocols = "knn,linear" + (",finetune" if finetune_epochs else "")
    finetune = [f"finetune.epochs={finetune_epochs}"] if finetune_epochs else []
    budget = [f"trainer.max_epochs={epochs}"] if epochs else []
    proc = run([sys.executable, "-m", "m3i_lightning", *overrides, f"seed={seed}", *budget,
                "trainer.enable_progress_bar=false", f"protocols=[{protocols}]", *finetune,
                f"hydra.run.dir={run_dir}", *shared],
               threads)
    result = {"objective": label, "seed": seed, "run_dir": str(run_dir)}
    report = run_dir / "eval.json"
    if proc.returncode or not report.exists():
        return {**result, "error": proc.stderr[-2000:]}
    return {**result, **json.loads(report.read_text())["results"], "feature": feature(run_dir),
            "seconds": round(time.perf_counter() - start, 1)}


def feature(run_dir: Path) -> str:
    """The global feature the run is evaluated on, as its exported backbone computes it."""
    config = json.loads((run_dir / "backbone" / "config.json").read_text())
    return FEATURES[config["model_args"].get("global_pool", "token")]


def summary(values: list[float]) -> str:
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def aggregate(results: list[dict]) -> dict[str, dict]:
    """label → protocol → the values of its seeds that ran, and the row's ``feature``."""
    table: dict[str, dict] = {}
    for r in results:
        row = table.setdefault(r["objective"], {key: [] for key in PROTOCOLS})
        row.setdefault("feature", r.get("feature"))
        for key in PROTOCOLS:
            if r.get(key) is not None:
                row[key].append(r[key])
    return table


def over_random_init(table: dict[str, dict], label: str) -> str:
    """The row's mean linear probe minus that of the random init read by the same feature."""
    row = table[label]
    baseline = table.get(f"random init ({row['feature']})")
    if label.startswith("random init") or not baseline or not row["linear_top1"] \
            or not baseline["linear_top1"]:
        return ""
    gap = statistics.mean(row["linear_top1"]) - statistics.mean(baseline["linear_top1"])
    return f"{100 * gap:+.1f}"


def best_single(table: dict[str, dict[str, list[float]]]) -> str | None:
    """The objective row (not random init, not M3I) with the best mean linear probe."""
    singles = {label: row["linear_top1"] for label, row in table.items()
               if row["linear_top1"] and not label.startswith(("random init", "M3I"))}
    return max(singles, key=lambda k: statistics.mean(singles[k])) if singles else None


def plot_probe_curves(results: list[dict], labels: list[str], out: Path) -> None:
    """Online kNN and linear probe (``val/*``, metrics.csv) against the step for ``labels``;
    a random-init row, which trains no step, is its end-of-run value as a gray line, dashed
    or dotted (one per feature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m3i_lightning.runtime.pictures import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    seed = results[0]["seed"]
    baseline_styles = iter(("--", ":", "-."))
    for label in labels:
        untrained = label.startswith("random init")
        style = next(baseline_styles) if untrained else None
        run_dir = next(Path(r["run_dir"]) for r in results
                       if r["objective"] == label and r["seed"] == seed)
        series = read_metrics(run_dir / "metrics.csv")
        final = next(r for r in results if r["objective"] == label and r["seed"] == seed)
        for axis, key in zip(axes, ("val/knn_top1", "val/linear_top1"), strict=True):
            if untrained and final.get(key[4:]) is not None:
                axis.axhline(100 * final[key[4:]], linestyle=style, color="gray", label=label)
            elif series.get(key):
                steps, values = zip(*series[key], strict=True)
                axis.plot(steps, [100 * v for v in values], marker="o", label=label)
    for axis, title in zip(axes, ("kNN top-1", "linear-probe top-1"), strict=True):
        axis.set(title=f"{title} on the held-out digits (seed {seed})", xlabel="step",
                 ylabel="top-1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help="pre-training epochs (default: cpu/base's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", choices=["default", "all"], default="default")
    parser.add_argument("--only", nargs="*", help="row labels starting with these names")
    parser.add_argument("--finetune-epochs", type=int, default=3,
                        help="epochs of the cpu fine-tuning recipe per run (0: none)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--curves", type=Path, help="PNG of the probes over training")
    parser.add_argument("--probe-every", type=int, default=2,
                        help="epochs between online probes (the --curves points)")
    parser.add_argument("--out", type=Path, default=Path("compare_objectives.json"))
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of every pre-training and fine-tuning run")
    args = parser.parse_args(argv)
    selected = [(label, o) for label, o in runs(args.rows)
                if not args.only or any(label.startswith(p) for p in args.only)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    root = args.keep or Path(tempfile.mkdtemp(prefix="compare_objectives_"))
    jobs = [(label, [*o, *online_probes(seed == args.seeds[0], args.probe_every)], seed,
             root / f"run{i}-seed{seed}")
            for i, (label, o) in enumerate(selected) for seed in args.seeds]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(pretrain_and_evaluate, label, o, seed, args.epochs,
                               args.finetune_epochs, run_dir, threads, args.set)
                   for label, o, seed, run_dir in jobs]
        results = []
        for future in futures:
            results.append(future.result())
            r = results[-1]
            print(f"done {r['objective']} seed {r['seed']}: "
                  + ("failed" if "error" in r else
                     ", ".join(f"{PROTOCOLS[k]} {100 * r[k]:.1f}" for k in PROTOCOLS if k in r)),
                  file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - start) / 60
    base = OmegaConf.load(BASE_RECIPE)
    epochs = args.epochs or base.trainer.max_epochs
    table = aggregate(results)
    best = best_single(table)
    args.out.write_text(json.dumps({"epochs": epochs, "seeds": args.seeds,
                                    "finetune_epochs": args.finetune_epochs,
                                    "minutes": round(minutes, 1), "best_single": best,
                                    "runs": results}, indent=2))
    if args.curves and best and "M3I (mix)" in table:
        plotted = ["M3I (mix)", best]
        baselines = dict.fromkeys(f"random init ({table[label]['feature']})"
                                  for label in plotted)
        plot_probe_curves(results, [*plotted, *(b for b in baselines if b in table)],
                          args.curves)
    for r in results:
        if "error" in r:
            print(f"{r['objective']} seed {r['seed']} failed:\n{r['error']}", file=sys.stderr)
    columns = [k for k in PROTOCOLS if any(row[k] for row in table.values())]
    print(f"{len(jobs)} runs in {minutes:.0f} min ({args.jobs} at a time): {epochs} epochs of "
          f"batch {base.global_batch_size} of pre-training on the embedded digits (each row's "
          "CPU recipe, conf/experiment/cpu/" + "".join(f", {o}" for o in args.set) + ")"
          + (f", then {args.finetune_epochs} epochs of the cpu fine-tuning recipe"
             if args.finetune_epochs else "")
          + f"; top-1 (%) on the 359 held-out digits, mean ± std over seeds {args.seeds}\n")
    print("| objective | read by | " + " | ".join(PROTOCOLS[k] for k in columns)
          + " | linear vs random init |")
    print("|---|---|" + "---|" * len(columns) + "---|")
    for label, row in table.items():
        print(f"| {label} | {row['feature'] or ''} | "
              + " | ".join(summary(row[k]) for k in columns)
              + f" | {over_random_init(table, label)} |")
    if best:
        print(f"\nbest single objective on the linear probe: {best}")


if __name__ == "__main__":
    main()
