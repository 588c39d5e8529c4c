"""Experiment trackers: an offline W&B run and a local MLflow run, together with metrics.csv, get
every loss term, the resolved config and the run's pictures; a resumed run continues the same
tracker runs; fine-tuning its checkpoint opens a tracker run with its own config and results."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from helpers import TINY_RUN, run

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

PIXEL_RUN = [*TINY_RUN, "objective=[mim_pixel,cls]", "objective.mim_pixel.decoder_dim=32",
             "objective.mim_pixel.decoder_depth=1", "objective.mim_pixel.decoder_heads=2",
             "protocols=[knn]", "logger=[csv,wandb,mlflow]"]
TERMS = ("train/loss/mim_pixel", "train/loss/cls")
PICTURES = {"curves", "mim_pixel_final"}


def wandb_records(path: Path):
    """The records of an offline W&B run file, read independently of wandb's own reader (it has
    none in Python): a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header
    (crc, length, type: 1 full, 2 first, 3 middle, 4 last), holding protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(folder: Path) -> dict:
    """Run id, config, history rows (by trainer step) and image keys of one offline run."""
    (path,) = folder.glob("run-*.wandb")
    seen = {"id": None, "config": {}, "history": {}, "images": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            seen["id"] = record.run.run_id
        elif kind == "config":
            seen["config"].update({item.key: json.loads(item.value_json)
                                   for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            images = {key.removesuffix("/_type") for key, value in row.items()
                      if key.endswith("/_type") and str(value).startswith("image")}
            seen["images"] |= images
            if not images:
                seen["history"].setdefault(int(row["trainer/global_step"]), {}).update(row)
    return seen


def csv_terms(run_dir: Path) -> dict[int, dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return {int(row["step"]): {t: float(row[t]) for t in TERMS}
                for row in csv.DictReader(f) if row.get(TERMS[0])}


def test_wandb_and_mlflow_receive_terms_config_pictures_and_resume_the_same_run(tmp_path,
                                                                              monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    run(*PIXEL_RUN, "trainer.max_steps=2", f"hydra.run.dir={out}")
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}
    terms = csv_terms(out)
    assert sorted(terms) == [0, 1]

    (first,) = (out / "wandb").glob("offline-run-*")
    wandb = wandb_run(first)
    assert wandb["id"] == ids["wandb"]
    assert wandb["config"]["objective"]["mim_pixel"]["decoder_dim"] == 32
    for step, values in terms.items():
        assert {t: wandb["history"][step][t] for t in TERMS} == pytest.approx(values)
    assert wandb["images"] == {f"pictures/{name}" for name in PICTURES}
    assert "eval/knn_top1" in wandb["history"][2]  # the evaluation table, at the last step

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.data.params["objective/mim_pixel/decoder_dim"] == "32"
    assert mlflow_run.data.params["trainer/max_steps"] == "2"
    for term in TERMS:
        history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], term)}
        assert history == pytest.approx({step: values[term] for step, values in terms.items()})
    artifacts = {Path(a.path).stem for a in client.list_artifacts(ids["mlflow"], "pictures")}
    assert artifacts == PICTURES
    assert "eval/knn_top1" in mlflow_run.data.metrics

    run(*PIXEL_RUN, "trainer.max_steps=4", "resume=auto", f"hydra.run.dir={out}")
    assert json.loads((out / "trackers.json").read_text()) == ids
    terms = csv_terms(out)
    assert sorted(terms) == [0, 1, 2, 3]
    (second,) = set((out / "wandb").glob("offline-run-*")) - {first}
    resumed = wandb_run(second)
    assert resumed["id"] == ids["wandb"]
    assert sorted(s for s, row in resumed["history"].items() if TERMS[0] in row) == [2, 3]
    assert resumed["history"][3]["train/loss/cls"] == pytest.approx(terms[3]["train/loss/cls"])
    experiment = client.get_run(ids["mlflow"]).info.experiment_id
    assert len(client.search_runs([experiment])) == 1
    steps = [m.step for m in client.get_metric_history(ids["mlflow"], TERMS[0])]
    assert sorted(steps) == [0, 1, 2, 3]

    tuned = tmp_path / "finetune"  # fine-tuning the run's checkpoint: its own tracker run
    run(f"checkpoint={out / 'checkpoints' / 'last.ckpt'}", *TINY_RUN[:6], "finetune.epochs=1",
        "logger=[csv,mlflow]", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tuned}", module="m3i_lightning.finetune")
    tuned_id = json.loads((tuned / "trackers.json").read_text())["mlflow"]
    finetuned = MlflowClient(f"sqlite:///{tuned / 'mlflow.db'}").get_run(tuned_id)
    assert finetuned.data.params["finetune/epochs"] == "1"
    top1 = json.loads((tuned / "finetune.json").read_text())["results"]["top1"]
    assert finetuned.data.metrics["eval/top1"] == pytest.approx(top1)
