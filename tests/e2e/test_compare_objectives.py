"""scripts/compare_objectives.py on a tiny ViT: the random-init row runs over several seeds
through pre-training (no step), kNN, linear probe and fine-tuning, and the printed table is the
mean ± std of the JSON's per-seed values."""

from __future__ import annotations

import importlib.util
import json
import statistics

from helpers import REPO

SCRIPT = REPO / "scripts" / "compare_objectives.py"
TINY = ["backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=1",
        "backbone.num_heads=2", "data.source_size=16"]


def load_script():
    spec = importlib.util.spec_from_file_location("m3i_compare_objectives", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_compared_configuration_has_its_untrained_twin():
    script = load_script()
    rows = dict(script.runs("default"))
    assert "trainer.max_steps=0" in rows["random init (class token)"]
    untrained_m3i = rows["random init (mean-pooled)"]
    assert [o for o in untrained_m3i if o != "trainer.max_steps=0"] == rows["M3I (mix)"]
    trained = [label for label, o in rows.items() if "trainer.max_steps=0" not in o]
    assert {"cls", "mim_feat", "sim_feat", "inst_disc (moco)", "M3I (mix)"} <= set(trained)
    assert "M3I w/o mix" in dict(script.runs("all"))


def test_the_random_init_row_over_two_seeds(tmp_path, capsys):
    out = tmp_path / "compare.json"
    load_script().main(["--only", "random init (class", "--seeds", "0", "1", "--epochs", "1",
                        "--finetune-epochs", "1", "--out", str(out), "--keep",
                        str(tmp_path / "runs"), "--set", *TINY, "finetune.batch_size=128",
                        "probe.epochs=5"])
    report = json.loads(out.read_text())
    assert [r.get("error") for r in report["runs"]] == [None] * 2
    printed = capsys.readouterr().out
    seeds = report["runs"]
    assert sorted(r["seed"] for r in seeds) == [0, 1]
    assert {r["objective"] for r in seeds} == {"random init (class token)"}
    cells = []
    for key in ("knn_top1", "linear_top1", "finetune_top1"):
        values = [100 * r[key] for r in seeds]
        assert all(0 <= v <= 100 for v in values)
        cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
    assert f"| random init (class token) | class token | {' | '.join(cells)} |  |" in printed


def test_each_row_is_measured_against_the_random_init_read_by_its_feature():
    script = load_script()
    table = {"random init (class token)": {"linear_top1": [0.5, 0.6], "feature": "class token"},
             "random init (mean-pooled)": {"linear_top1": [0.7], "feature": "mean-pooled"},
             "mim_feat": {"linear_top1": [0.8, 0.76], "feature": "mean-pooled"},
             "cls": {"linear_top1": [0.6], "feature": "class token"}}
    assert script.over_random_init(table, "mim_feat") == "+8.0"  # 78 - 70
    assert script.over_random_init(table, "cls") == "+5.0"  # 60 - 55
    assert script.over_random_init(table, "random init (mean-pooled)") == ""
