"""Objects complete at construction: nothing writes into another object's fields afterwards.
The data module reads the fields its trained model asks for, a global batch is split before
the data is built, and evaluation builds its own config instead of rewriting the command's."""

from __future__ import annotations

import lightning as L
import pytest
from helpers import compose_config, digits_module, tiny_multi
from omegaconf import OmegaConf

from m3i_lightning.commands.eval import data_config
from m3i_lightning.commands.pretrain import per_process_batch
from m3i_lightning.config.factory import build_datamodule
from m3i_lightning.config.trainer import process_count


class BatchKeys(L.Callback):
    def __init__(self) -> None:
        self.seen: list[set[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(set(batch))


def test_a_plain_fit_builds_only_the_fields_the_model_reads(tokenizer):
    """cls reads view1 and its label: no second view, caption or geometry is built, although
    the digits provide them; a data module given its fields keeps them."""
    model = tiny_multi(tokenizer, ["cls"])
    data = digits_module(tokenizer, batch_size=8)
    assert data.fields == data.provides >= {"view1", "view2", "geometry", "label", "text"}
    keys = BatchKeys()
    L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
              devices=1, callbacks=[keys]).fit(model, datamodule=data)
    assert keys.seen == [{"view1", "view1_geometry", "label"}] * 2
    assert data.requested_fields is None
    given = digits_module(tokenizer, fields={"view1", "view2", "geometry"})
    assert given.fields == {"view1", "view2", "geometry"}


@pytest.mark.parametrize("trainer", [dict(devices=1), dict(devices=2), dict(devices=2,
                                                                             num_nodes=2)])
def test_a_global_batch_is_split_over_the_processes_before_the_data_is_built(tokenizer,
                                                                             trainer):
    options = [f"trainer.{key}={value}" for key, value in trainer.items()]
    cfg = compose_config("global_batch_size=8", "trainer.accelerator=cpu", *options)
    processes = L.Trainer(accelerator="cpu", logger=False, **trainer).world_size
    assert process_count(cfg) == processes
    data = build_datamodule(cfg.data, tokenizer, batch_size=per_process_batch(cfg))
    assert data.batch_size == 8 // processes
    assert per_process_batch(compose_config("data.batch_size=5")) is None


def test_evaluation_data_is_a_new_config_and_the_commands_stays_as_given():
    command = compose_config("data.batch_size=7", name="eval")
    trained = compose_config("data=imagefolder", "data.path=/images", "data.batch_size=3",
                             tiny=False)
    before = OmegaConf.to_container(command)
    stored = data_config(command, trained, ["data.num_workers=1"], img_size=24)
    assert (stored.name, stored.path, stored.batch_size) == ("imagefolder", "/images", 3)
    assert (stored.num_workers, stored.img_size) == (1, 24)
    chosen = data_config(command, trained, ["data=embedded"], img_size=24)
    assert (chosen.name, chosen.batch_size, chosen.img_size) == ("embedded", 7, 24)
    assert OmegaConf.to_container(command) == before
