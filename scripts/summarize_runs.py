"""One table of final metrics across the runs of a sweep folder (or any folder of runs).

    python -m m3i_lightning -m 'objective=[mim_feat,clip,cls],[cls]' optim.lr=1e-3,3e-3
    python scripts/summarize_runs.py multirun/2026-01-31/12-00-00

A run is a folder with ``.hydra/overrides.yaml``; its row shows the overrides that differ
between the runs (those shared by all are printed once, above the table), the last logged
value of every training loss in ``metrics.csv`` and the evaluation results of ``eval.json``.
A job that failed with an error is marked FAILED with its error line; a run without metrics
(still running, or killed) shows that instead.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml


def find_runs(root: Path) -> list[Path]:
    runs = {p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
    return sorted(runs, key=lambda p: [int(s) if s.isdigit() else s for s in p.parts])


def overrides(run: Path) -> dict[str, str]:
    items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(item.split("=", 1) for item in items)


def final_metrics(run: Path) -> dict[str, str]:
    """Last logged step and value of each ``train/loss*`` column, then the eval results."""
    step, metrics = None, {}
    if (run / "metrics.csv").is_file():
        with open(run / "metrics.csv") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key.startswith("train/loss"):
                        metrics[key.removeprefix("train/")] = f"{float(value):.4f}"
                        step = row["step"]
    if step is not None:
        metrics = {"step": step, **metrics}
    if (run / "eval.json").is_file():
        results = json.loads((run / "eval.json").read_text()).get("results", {})
        metrics.update({k: f"{100 * v:.2f}%" for k, v in results.items()})
    return metrics


FAILED_FILE = "FAILED"  # written by the training command into a sweep job's folder that failed


def _name(run: Path, root: Path, metrics: dict) -> str:
    name = str(run.relative_to(root)) if run != root else "."
    if (run / FAILED_FILE).is_file():
        return f"{name} (FAILED: {(run / FAILED_FILE).read_text().strip()})"
    return name if metrics else f"{name} (no metrics: still running, or killed)"


def table(runs: list[Path], root: Path) -> str:
    settings = [overrides(r) for r in runs]
    shared = {k: v for k, v in settings[0].items() if all(s.get(k) == v for s in settings)}
    varied = list(dict.fromkeys(k for s in settings for k in s if k not in shared))
    results = [final_metrics(r) for r in runs]
    found = list(dict.fromkeys(k for m in results for k in m))
    metrics = sorted(found, key=lambda k: (k != "step", not k.startswith("loss"), found.index(k)))
    header = ["run", *varied, *metrics]
    rows = [[_name(r, root, m), *(s.get(k, "") for k in varied), *(m.get(k, "") for k in metrics)]
            for r, s, m in zip(runs, settings, results, strict=True)]
    lines = [f"shared: {' '.join(f'{k}={v}' for k, v in shared.items()) or '-'}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a sweep folder (hydra.sweep.dir) or any "
                        "folder holding run folders")
    root = parser.parse_args().folder
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"no runs (folders with .hydra/overrides.yaml) under {root}")
    print(table(runs, root))


if __name__ == "__main__":
    main()
