"""``last.ckpt``'s triggers (runtime/checkpointing.LastCheckpoint): a preempted run loses at
most one epoch, also when validation runs only every few epochs."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from m3i_lightning.runtime.checkpointing import LastCheckpoint


class Regression(L.LightningModule):
    """A linear fit that records the epoch and step of every checkpoint it is saved into."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.saved: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.saved.append((self.current_epoch, self.global_step))


def fit(tmp_path, every_n_steps: int | None) -> list[tuple[int, int]]:
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    model = Regression()
    trainer = L.Trainer(max_epochs=3, check_val_every_n_epoch=10, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LastCheckpoint(tmp_path, every_n_steps)])
    trainer.fit(model, data, data)
    assert (tmp_path / "last.ckpt").is_file()
    return model.saved


def test_every_epoch_is_saved_though_validation_runs_every_ten(tmp_path):
    assert fit(tmp_path, None) == [(0, 2), (1, 4), (2, 6)]


def test_every_n_steps_and_zero_saves_on_the_way_and_at_the_end(tmp_path):
    """At the end, the epoch counter has passed the last epoch."""
    assert fit(tmp_path / "steps", 4) == [(1, 4), (3, 6)]
    assert fit(tmp_path / "end", 0) == [(3, 6)]
