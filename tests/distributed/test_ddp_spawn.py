"""A standalone objective in a user's own Lightning project: ``Classification(backbone=b)``
trained with ``strategy="ddp_spawn"`` on 2 CPU processes (gloo), which pickles the module to
send it to each process."""

from __future__ import annotations

import copy

import lightning as L
import torch
from helpers import digits_module, tiny_backbone

from m3i_lightning.objectives import Classification


class SameWeightsOnEveryRank(L.Callback):
    """Each process's parameter sums, gathered at the end of the fit: DDP kept the two equal
    although each process trained on its own share of the data."""

    def on_train_end(self, trainer, pl_module) -> None:
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(sums)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1]), gathered


def test_a_standalone_objective_trains_with_ddp_spawn_on_two_processes(tokenizer,
                                                                       monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned processes share 2 cores
    torch.manual_seed(0)
    model = Classification(backbone=tiny_backbone(depth=1), num_classes=10)
    initial = copy.deepcopy(model.state_dict())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SameWeightsOnEveryRank()])
    trainer.fit(model, datamodule=digits_module(tokenizer, batch_size=8))
    trained = model.state_dict()  # rank 0's weights, sent back to this process
    assert type(model.head) is Classification
    assert all(torch.isfinite(v).all() for v in trained.values())
    moved = [k for k, v in initial.items() if not torch.equal(v, trained[k])]
    assert "heads.cls.class_embed.weight" in moved and any(k.startswith("backbone.") for k in moved)
