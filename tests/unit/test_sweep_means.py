"""scripts/sweep_means.py on planted runs: one row per setting, mean ± std over seeds."""

from __future__ import annotations

import json

import yaml
from sweep_means import main


def plant(root, name: str, overrides: list[str], linear: float | None, weight: float) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "metrics.csv").write_text(f"step,train/weight/cls\n0,1.0\n7,{weight}\n")
    if linear is not None:
        (run / "eval.json").write_text(json.dumps({"results": {"linear_top1": linear}}))
        summary = {"cos": {"a-b": {"mean": linear - 1}}, "share": {"a": linear}}
        (run / "interplay.json").write_text(json.dumps({"summary": summary}))


def test_rows_per_setting_over_seeds(tmp_path, capsys):
    for seed, (linear, weight) in enumerate([(0.5, 0.8), (0.7, 0.6)]):
        plant(tmp_path, f"u{seed}", ["lr=1", "weighting=uncertainty", f"seed={seed}"], linear,
              weight)
    plant(tmp_path, "f0", ["lr=1", "weighting=fixed", "seed=0"], 0.4, 1.0)
    plant(tmp_path, "f1", ["lr=1", "weighting=fixed", "seed=1"], None, 1.0)
    table = main([str(tmp_path)]).splitlines()
    assert table[0] == "shared: lr=1"
    rows = {line.split(" | ")[0]: line for line in table[4:]}
    assert rows["| weighting=fixed"].startswith("| weighting=fixed | 1 (1 failed) | – | 40.0 |")
    uncertainty = rows["| weighting=uncertainty"]
    assert "| 2 | – | 60.0 ± 14.1 |" in uncertainty
    assert "cls 0.70 ± 0.14" in uncertainty and "a-b -0.40 ± 0.14" in uncertainty
    assert "a 0.60 ± 0.14" in uncertainty
