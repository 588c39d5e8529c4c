"""A run prints what the user needs (#31, items 22 and 23): the collapse warning waits for its
warm-up and quotes the criterion that fired; the lines that ask nothing of the user are
silenced where they arise."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import digits_module, tiny_backbone, tiny_multi

from m3i_lightning.components.text import ByteTokenizer, TextTower
from m3i_lightning.evaluation.health import RepresentationHealth
from m3i_lightning.finetune.module import Classifier, FineTuning
from m3i_lightning.runtime.console import quiet_lightning


def collapsed(rank: float, std: float) -> dict:
    return {"rankme": torch.tensor(rank), "std": torch.tensor(std)}


@pytest.mark.parametrize("rank, std, fired, quiet", [
    (1.2, 0.25, "RankMe 1.20 is below health.min_rank=2.0", "normalised std"),
    (8.0, 0.01, "the normalised std 0.0100 is below health.min_std=0.1 of its spread value "
                "0.2500", "RankMe"),
])
def test_the_collapse_warning_waits_for_its_warm_up_and_quotes_what_fired(rank, std, fired,
                                                                          quiet):
    health = RepresentationHealth(warmup_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health.warn_if_collapsed(collapsed(rank, std), 16, step=20)
        assert not caught  # inside the warm-up: a fresh network starts narrow
        health.warn_if_collapsed(collapsed(rank, std), 16, step=100)
    message = str(caught[0].message)
    assert fired in message and quiet not in message


def test_a_python_api_fit_with_a_teacher_does_not_warn_of_eval_mode(tokenizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tiny_multi(tokenizer, ["mim_feat"])  # its EMA teacher is in eval mode
        L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu").fit(model, digits_module(tokenizer))
    assert not [w for w in caught if "module(s) in eval mode" in str(w.message)]


def test_saving_the_text_tower_draws_no_progress_bar(tmp_path, capsys):
    TextTower(ByteTokenizer(context_length=8), embed_dim=8, width=8, layers=1,
              heads=2).save(tmp_path)
    assert (tmp_path / "config.json").exists()
    assert "Writing model shards" not in capsys.readouterr().err


ADVICE = ("It is recommended to use `self.log('val/top1', ..., sync_dist=True)` when logging on "
          "epoch level in distributed setting to accumulate the metric across devices.")
PYTREE = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) "
          "and treespec.is_leaf()` instead.")


@pytest.mark.parametrize("source, message, category", [
    (lambda: FineTuning(Classifier(tiny_backbone(), 2)), ADVICE, UserWarning),
    (quiet_lightning, PYTREE, FutureWarning)], ids=["sync_dist advice", "pytree"])
def test_lines_that_ask_nothing_of_the_user_are_silenced(source, message, category):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source()
        warnings.warn(message, category, stacklevel=1)  # as Lightning words it
    assert not caught
