"""Fine-tuning on two gloo processes: FSDP2 tracks DDP."""

from __future__ import annotations

import torch
from helpers import TINY_FINETUNE, TWO_CPU_PROCESSES, losses, run


def test_fsdp2_fine_tuning_tracks_ddp(tmp_path):
    """2 gloo processes, 4 steps of the CPU recipe with an EMA: the per-step losses of FSDP2
    and DDP agree (rtol 1e-4), as do their last checkpoints' weights, EMA included."""
    common = [*TINY_FINETUNE, *TWO_CPU_PROCESSES, "random_init=true", "finetune.epochs=1",
              "finetune.ema=0.5", "+trainer.limit_train_batches=4", "trainer.log_every_n_steps=1",
              "+trainer.limit_val_batches=2"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run(*common, "strategy=fsdp", f"hydra.run.dir={fsdp}", module="m3i_lightning.finetune")
    run(*common, "strategy=ddp", f"hydra.run.dir={ddp}", module="m3i_lightning.finetune")
    assert sorted(losses(fsdp)) == [0, 1, 2, 3]
    torch.testing.assert_close(losses(fsdp), losses(ddp), rtol=1e-4, atol=0)
    sharded, replicated = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
                           for d in (fsdp, ddp))
    assert any(k.startswith("ema.") for k in replicated["state_dict"])
    assert sharded["state_dict"].keys() == replicated["state_dict"].keys()
    for name, value in replicated["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][name], value, rtol=1e-4, atol=1e-6,
                                   msg=name)
