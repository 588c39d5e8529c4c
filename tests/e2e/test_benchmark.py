"""scripts/benchmark.py in its quickest mode on the tiny ViT: the table and the JSON carry the
throughput rows, the ratios with their targets and the multi-crop comparison; each distinct
input is encoded once and the training step stays free of host-device syncs but the NaN check."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from helpers import REPO

from m3i_lightning.components.text import ByteTokenizer, TextTower

SCRIPT = REPO / "scripts" / "benchmark.py"
TINY = ["backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=2",
        "backbone.num_heads=2", "data.source_size=16"]
RATIOS = {"composition shared", "composition native", "overhead Lightning/plain",
          "masked encoding speed-up"}


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("m3i_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def quick_run(benchmark, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    benchmark.main(["--quick", "--batch-size", "4", "--objectives", "cls", "--set", *TINY,
                    "--out", str(out)])
    return json.loads(out.read_text())


def test_quick_run_reports_every_ratio_with_its_target(quick_run, capsys):
    ratios = {row["name"]: row for row in quick_run["ratios"]}
    assert set(ratios) == RATIOS
    for row in ratios.values():
        assert math.isfinite(row["value"]) and row["value"] > 0
        assert row["target"].split()[0] in ("<=", ">=") and isinstance(row["met"], bool)
    configs = {row["config"] for row in quick_run["throughput"]}
    assert {"mim_feat", "clip", "cls", "[mim_feat,clip,cls] shared",
            "[mim_feat,clip,cls] native", "experiment=m3i"} <= configs
    assert all(row["images_per_s"] > 0 for row in quick_run["throughput"])
    assert quick_run["gpu"] == "skipped: no CUDA device" or quick_run["gpu"][0]["mfu"]


def test_multicrop_section_compares_six_local_crops_with_none(quick_run, capsys):
    """One row, measured in the run: the 2+6 step over the 2+0 step, time and peak memory; the
    local crops add a student pass unless they share the global views' size (the tiny ViT's
    16 px), when the engine encodes all crops in one."""
    (row,) = quick_run["multicrop"]
    assert row["name"] == "multi-crop 2+6 / 2+0" and row["model"] == "vit_cpu"
    assert math.isfinite(row["step_time"]) and row["step_time"] > 0
    assert row["peak_memory"] is None or row["peak_memory"] > 0
    assert row["student_passes"] == {"2+0": 1, "2+6": 1}


def test_each_distinct_input_is_encoded_once(quick_run):
    """Shared: one masked view read by all three objectives; native: the masked view (mim_feat)
    and the full view (clip and cls together); the teacher encodes its target view once."""
    passes = {row["config"]: (row["student_passes"], row["teacher_passes"])
              for row in quick_run["throughput"]}
    assert passes["[mim_feat,clip,cls] shared"] == (1, 1)
    assert passes["[mim_feat,clip,cls] native"] == (2, 1)
    assert passes["cls"] == (1, 0)


def test_the_step_waits_for_the_device_only_in_the_nan_check(quick_run):
    """check_finite_every=1 syncs once per step; nothing else in the engine or the objectives
    (the "all" row holds every registered objective) may read a device value."""
    assert {row["syncs_per_step"] for row in quick_run["throughput"]} == {1}


def test_every_configuration_reports_its_peak_memory(quick_run):
    if quick_run["throughput"][0]["peak_mb"] is None:
        pytest.skip("no resident-set high-water mark here (needs Linux /proc/self/status "
                    "and /proc/self/clear_refs)")
    assert all(row["peak_mb"] > 0 for row in quick_run["throughput"])


def test_eval_option_runs_the_knn_memory_benchmark_with_the_options_after_it(benchmark,
                                                                              tmp_path, capsys):
    """A tiny bank: one row per (queries, chunk size), its model figure the float32 bytes of
    the normalised bank, one chunk's similarities and the returned scores."""
    out = tmp_path / "knn.json"
    assert benchmark.main(["--eval", "--bank", "300", "--dim", "8", "--queries", "40", "100",
                           "--chunk-sizes", "16", "64", "--device", "cpu",
                           "--json", str(out)]) == {}
    rows = json.loads(out.read_text())
    assert [(r["queries"], r["chunk_size"]) for r in rows] == [(40, 16), (40, 64), (100, 16),
                                                              (100, 64)]
    for row in rows:
        chunk = min(row["chunk_size"], row["queries"])
        expected = 4 * (300 * 8 + chunk * 300 + row["queries"] * 1000) / 2**20
        assert row["predicted_mb"] == pytest.approx(expected)
        assert row["dense_mb"] == pytest.approx(4 * row["queries"] * 300 / 2**20)
        assert row["device"] == "cpu" and row["seconds"] > 0
    assert capsys.readouterr().out.count("| 300 × 8 |") == 4


def test_data_section_reports_both_augmentation_paths(benchmark, tmp_path):
    """``--data`` at the tiny size on CPU: the 224 px pipelines against torchvision's (images/s,
    ratio and threads for BYOL's and MAE's views on every path), loader images/s of each
    ``data.augment_on`` path, the device rendering, the training step, and the ratios, all
    positive and finite."""
    out = tmp_path / "data.json"
    benchmark.main(["--data", "--images", "4", "--rounds", "1", "--workers", "0", "--batches",
                    "1", "--json", str(out), *TINY, "data.batch_size=4"])
    rows = {row["name"]: row["value"] for row in json.loads(out.read_text())}
    for recipe in ("BYOL 2 views", "MAE 1 view"):
        for path in ("torchvision ImageFolder + v2 (PIL)", "m3i workers",
                     "m3i device, CPU share: read + ship JPEG bytes",
                     "m3i device, CPU share: reduced-scale decode"):
            for measure in ("images/s per thread", "ratio to torchvision", "threads for 2500"):
                assert any(name.startswith(f"{recipe}: {path}") and measure in name
                           for name in rows), (recipe, path, measure)
    for path in ("workers", "device"):
        assert any(name.startswith(f"{path}: loader images/s, one worker") for name in rows)
        assert any(name.startswith(f"{path}: loader (0 workers) / training step")
                   for name in rows)
    assert "one worker: device / workers (images/s)" in rows
    assert any(name.startswith("device: rendering images/s on cpu") for name in rows)
    assert all(math.isfinite(value) and value > 0 for value in rows.values())


def test_text_tower_drops_the_padding_mask_only_where_it_changes_nothing():
    """Right padding after the end token: the pooled caption embedding is the same with and
    without the mask (causal attention), so the tower leaves the mask and its sync out."""
    torch.manual_seed(0)
    tokenizer = ByteTokenizer(context_length=16)
    tower = TextTower(tokenizer, embed_dim=16, width=16, layers=1, heads=2).eval()
    tokens = tokenizer(["a two", "a handwritten digit nine"])
    assert not tower.needs_mask and (tokens["attention_mask"] == 0).any()
    with torch.no_grad():
        masked = tower.model(input_ids=tokens["input_ids"],
                             attention_mask=tokens["attention_mask"]).text_embeds
        torch.testing.assert_close(tower(tokens["input_ids"], tokens["attention_mask"]), masked)
    tokenizer.padding_side = "left"
    assert TextTower(tokenizer, embed_dim=16, width=16, layers=1, heads=2).needs_mask
