"""Mean ± std over seeds of a sweep's runs: one row per setting of the swept overrides other
than ``seed``, with the end-of-run scores (``eval.json``), the last learned weights
(``train/weight/<objective>``, weighting=uncertainty) and the interplay summary
(``interplay.json``: each pair's mean cosine, each objective's mean share of the step).

    python -m m3i_lightning -m ... weighting=fixed,uncertainty,pcgrad seed=0,1,2 \\
        hydra.sweep.dir=outputs/weighting
    python scripts/sweep_means.py outputs/weighting

Prints a Markdown table (runs without ``eval.json`` are counted as failed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import yaml

SCORES = {"knn_top1": "kNN", "linear_top1": "linear probe", "zero_shot_top1": "zero-shot",
          "finetune_top1": "fine-tune"}


def setting(run: Path) -> tuple[str, ...]:
    items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    return tuple(o for o in items if not o.startswith("seed="))


def last_weights(run: Path) -> dict[str, float]:
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    weights: dict[str, float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            weights.update({k.removeprefix("train/weight/"): float(v) for k, v in row.items()
                            if k.startswith("train/weight/") and v})
    return weights


def cell(values: list[float], scale: float = 100, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = f"{scale * statistics.mean(values):.{digits}f}"
    return mean + (f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args(argv)
    runs = sorted(p.parent.parent for p in args.sweep.glob("**/.hydra/overrides.yaml"))
    groups: dict[tuple[str, ...], list[Path]] = {}
    for run in runs:
        groups.setdefault(setting(run), []).append(run)
    shared = set.intersection(*(set(s) for s in groups)) if groups else set()
    lines = [f"shared: {' '.join(o for o in next(iter(groups), ()) if o in shared)}", "",
             "| setting | runs | " + " | ".join(SCORES.values())
             + " | learned weights | pairwise cosine (mean) | share of the step |",
             "|---|---|" + "---|" * len(SCORES) + "---|---|---|"]
    for key, members in groups.items():
        results = [json.loads((r / "eval.json").read_text())["results"] for r in members
                   if (r / "eval.json").is_file()]
        records = [json.loads((r / "interplay.json").read_text())["summary"] for r in members
                   if (r / "interplay.json").is_file()]
        weights = [last_weights(r) for r in members]
        names = sorted({n for w in weights for n in w})
        learned = ", ".join(f"{n} {cell([w[n] for w in weights if n in w], 1, 2)}"
                            for n in names) or "–"
        cosines = ", ".join(f"{p} {cell([s['cos'][p]['mean'] for s in records], 1, 2)}"
                            for p in (records[0]["cos"] if records else {})) or "–"
        shares = ", ".join(f"{n} {cell([s['share'][n] for s in records], 1, 2)}"
                           for n in (records[0]["share"] if records else {})) or "–"
        failed = len(members) - len(results)
        label = " ".join(o for o in key if o not in shared) or "(all)"
        lines.append(f"| {label} | {len(results)}" + (f" ({failed} failed)" if failed else "")
                     + " | " + " | ".join(cell([r[k] for r in results if k in r]) for k in SCORES)
                     + f" | {learned} | {cosines} | {shares} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
