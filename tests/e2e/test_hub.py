"""The exported folder as a Hub model: timm's ``local-dir:`` loads it with no other argument, its
model card holds the run's objectives and evaluation table, and ``push_to_hub=`` uploads the
folder with huggingface_hub (only its network calls stubbed); no token or a refused push is one
error line and the folder stays."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx  # huggingface_hub's HTTP client
import huggingface_hub
import pytest
import timm
import torch
from helpers import compose_config, fails_with_one_line, fit_and_save
from huggingface_hub.utils import hf_raise_for_status

from m3i_lightning.commands import export as export_command
from m3i_lightning.config.model_card import CARD_FILE

EVAL = {"run_dir": "run", "results": {"knn_top1": 0.4125, "linear_top1": 0.5},
        "data": {"config": "data=embedded", "samples": {"train": 1438, "val": 359}},
        "knn": {"k": 20, "temperature": 0.07, "chunk_size": 4096},
        "probe": {"epochs": 3, "batch_size": 256, "lr": 0.01, "weight_decay": 1e-4}}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-step [mim_pixel, cls] run folder: checkpoints/last.ckpt, then its eval.json."""
    cfg = compose_config("objective=[mim_pixel,cls]", "objective.mim_pixel.decoder_dim=32",
                         "objective.mim_pixel.decoder_depth=1",
                         "objective.mim_pixel.decoder_heads=2", "objective.cls.weight=0.5",
                         "data.batch_size=16")
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    model, _, _ = fit_and_save(cfg, 2, run / "checkpoints" / "last.ckpt")
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run, model


@pytest.fixture
def no_network(monkeypatch):
    """huggingface_hub's calls that would reach the Hub, recorded instead."""
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in
                       Path(folder_path).rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, {"files": files, "token": self.token, **kw}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_export_loads_by_local_dir_and_its_card_holds_the_eval_table(finished_run, tmp_path,
                                                                     capsys):
    run, model = finished_run
    out = tmp_path / "export"
    export_command.main([f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", f"out={out}"])
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), model.backbone.eval()(images).global_feature)

    card = (out / CARD_FILE).read_text()
    metadata = card.split("---")[1]
    assert "library_name: timm" in metadata and "- mim_pixel" in metadata
    assert "\nlicense:" not in metadata
    assert "| `mim_pixel` | 1.0 |" in card and "| `cls` | 0.5 |" in card
    assert "41.25%" in card and "50.00%" in card and "359 held-out images" in card
    assert 'timm.create_model("hf-hub:<org>/<name>", pretrained=True)' in card

    os.utime(run / "checkpoints" / "last.ckpt")  # resumed after the evaluation: stale table
    export_command.main([f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", f"out={out}"])
    assert "41.25%" not in (out / CARD_FILE).read_text()
    (run / "eval.json").write_text(json.dumps(EVAL))


def test_push_uploads_the_exported_folder(finished_run, tmp_path, monkeypatch, no_network,
                                          capsys):
    run, _ = finished_run
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "export"
    export_command.main([f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                         "push_to_hub=me/vit-m3i"])
    (create, repo, options), (upload, repo_again, sent) = no_network
    assert (create, repo, upload, repo_again) == ("create_repo", "me/vit-m3i", "upload_folder",
                                                  "me/vit-m3i")
    assert options["private"] is False and sent["token"] == "hf_test_token"
    assert sent["files"] == sorted(["README.md", "config.json", "model.safetensors"])
    assert 'timm.create_model("hf-hub:me/vit-m3i"' in (out / CARD_FILE).read_text()
    assert "https://huggingface.co/me/vit-m3i/commit/abc" in capsys.readouterr().out


def test_push_without_token_or_refused_is_one_line_and_the_folder_stays(
        finished_run, tmp_path, monkeypatch, no_network, capsys):
    run, _ = finished_run
    out = tmp_path / "export"
    args = (f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", f"out={out}",
            "push_to_hub=me/vit-m3i")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached login
    line = fails_with_one_line(capsys, monkeypatch, export_command.main, "m3i-export", *args)
    assert "needs a Hugging Face token" in line and str(out) in line
    assert not no_network and (out / "model.safetensors").is_file()

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def refuse(self, *, repo_id, **kw):
        """What the Hub answers a token without write access: a 403 response."""
        url = f"https://huggingface.co/api/models/{repo_id}/preupload/main"
        response = httpx.Response(403, request=httpx.Request("POST", url),
                                  json={"error": "You don't have the rights to this repo"})
        hf_raise_for_status(response)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    line = fails_with_one_line(capsys, monkeypatch, export_command.main, "m3i-export", *args)
    assert line.startswith("error: push to me/vit-m3i refused: 403")
    assert (out / "model.safetensors").is_file() and (out / CARD_FILE).is_file()
