"""An export replaces its folder as a whole (#31): an earlier export's text side does not
survive beside a model trained without one, a failed export leaves the previous folder as it
was, a folder of something else is refused and left alone, and the process umask is never
touched."""

from __future__ import annotations

import errno
import os

import pytest
from helpers import tiny_backbone, tiny_objective

from m3i_lightning.config import artifacts
from m3i_lightning.config.artifacts import (
    CONFIG_FILE,
    IMAGE_TEXT_FILE,
    WEIGHTS_FILE,
    export_model,
    load_exported,
)
from m3i_lightning.core.errors import M3IError
from m3i_lightning.evaluation.protocols import TrainedModel


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def clip_export(tmp_path, tokenizer):
    """A folder exported from a model with clip: the backbone and clip's text side."""
    out = tmp_path / "exported"
    export_model(TrainedModel(tiny_backbone(), tiny_objective("clip", tokenizer)), out)
    assert (out / "clip").is_dir() and (out / IMAGE_TEXT_FILE).is_file()
    return out


def test_an_export_over_an_earlier_one_leaves_none_of_its_files(clip_export, monkeypatch):
    """Exported again from a model without clip: the folder then holds the backbone alone, so
    evaluating it cannot report a zero-shot score of the earlier model's text tower. The
    umask is read from nowhere (once flipped and restored, racing other threads)."""
    monkeypatch.setattr(os, "umask", lambda *args: pytest.fail("export touched the umask"))
    backbone = tiny_backbone(depth=1)
    export_model(TrainedModel(backbone), clip_export)
    assert sorted(p.name for p in clip_export.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert load_exported(clip_export).image_text is None
    assert len(load_exported(clip_export).backbone.blocks()) == 1
    assert sorted(p.name for p in clip_export.parent.iterdir()) == [clip_export.name]


def test_weight_files_get_the_mode_of_any_new_file(tmp_path):
    """The safetensors writer makes its files private; teams share run folders."""
    old = os.umask(0o027)
    try:
        export_model(TrainedModel(tiny_backbone()), tmp_path / "exported")
        assert os.umask(0o027) == 0o027  # unchanged by the export
    finally:
        os.umask(old)
    assert (tmp_path / "exported" / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o640


def test_a_failed_export_leaves_the_previous_folder_as_it_was(clip_export, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = snapshot(clip_export)
    monkeypatch.setattr(artifacts, "export_image_text", disk_full)
    with pytest.raises(M3IError, match="No space left on device"):
        export_model(TrainedModel(tiny_backbone(), object()), clip_export)
    assert snapshot(clip_export) == before
    assert sorted(p.name for p in clip_export.parent.iterdir()) == [clip_export.name]


def test_a_folder_of_something_else_is_refused_and_left_alone(tmp_path):
    """Replacing it as a whole would delete the user's files; they keep their modes too."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "private.safetensors").write_bytes(b"weights")
    (out / "private.safetensors").chmod(0o600)
    before = snapshot(out)
    with pytest.raises(M3IError, match="it holds files of something else"):
        export_model(TrainedModel(tiny_backbone()), out)
    assert snapshot(out) == before
    assert (out / "private.safetensors").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
