"""The Lightning strategy named by ``conf/strategy``: the one place a name becomes an engine.

- ``auto``: Lightning picks (one device, or DDP over several).
- ``ddp``: data parallel; contrastive negatives are gathered across ranks by the objectives.
- ``fsdp``: FSDP2 (``fully_shard`` per transformer block, see :mod:`m3i_lightning.engine.sharding`)
  through Lightning's ``ModelParallelStrategy``; runs on CPU (gloo) as on GPUs (nccl).
- ``fsdp1``: Lightning's ``FSDPStrategy`` (FSDP1) wrapping the same blocks; CUDA only.

Sharded runs write consolidated checkpoints (one file, gathered on rank 0) by default, so
``last.ckpt`` is written atomically like any other and resumes under any strategy or world
size; ``checkpoint.sharded=true`` (FSDP2 only) has every rank write its shards instead (see
:mod:`m3i_lightning.runtime.sharded_checkpoint`). After the fit every rank gets the consolidated
model, for the end-of-run evaluation on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.checkpoint.api import CheckpointException

from m3i_lightning.backbone import Backbone
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import Engine
from m3i_lightning.engine.sharding import block_classes
from m3i_lightning.runtime.sharded_checkpoint import ShardedCheckpointWriter, damaged

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp1")


class FullyShardedDataParallel(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2 data parallelism: one data-parallel group of
    every process (its defaults would give tensor parallelism within a node instead, and every
    process of a node the same batch). With ``sharded``, checkpoints are Lightning's sharded
    folders, written atomically (and in the background with ``asynchronous``) by a
    :class:`ShardedCheckpointWriter`; Lightning loads them, resharded to any world size."""

    def __init__(self, sharded: bool = False, asynchronous: bool = False) -> None:
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=sharded)
        self.checkpoint_writer = ShardedCheckpointWriter(asynchronous) if sharded else None

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath,
                        storage_options: Any = None) -> None:
        if self.checkpoint_writer is None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        else:
            self.checkpoint_writer.save(checkpoint, Path(self.broadcast(filepath)))

    def load_checkpoint(self, checkpoint_path, *args, **kwargs) -> dict[str, Any]:
        """Lightning's load of the checkpoint a run resumes from; shards whose bytes are
        damaged (the index and sizes were checked before) are one error line."""
        try:
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
        except CheckpointException as err:
            raise ConfigError(f"resume={checkpoint_path} {damaged(err)}") from None

    def wait_for_checkpoint(self) -> None:
        """Until the checkpoint being written in the background, if any, is on disk."""
        if self.checkpoint_writer is not None:
            self.checkpoint_writer.wait()

    def teardown(self) -> None:
        self.wait_for_checkpoint()
        super().teardown()

    def full_state_dict(self) -> dict[str, Any]:
        """The model's full weights on rank 0 (empty elsewhere), whatever the checkpoints."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))


def build_strategy(cfg: Mapping, model: Engine, checkpoint: Mapping | None = None
                   ) -> Strategy | str:
    """The strategy for ``cfg.name``; ``model`` gives the block classes FSDP1 wraps;
    ``checkpoint`` (``cfg.checkpoint``) asks for sharded and asynchronous checkpoints."""
    name = cfg["name"]
    sharded = bool(checkpoint and checkpoint.get("sharded"))
    asynchronous = bool(checkpoint and checkpoint.get("async"))
    if asynchronous and not sharded:
        raise ConfigError("checkpoint.async=true writes sharded checkpoints in the background: "
                          "it needs checkpoint.sharded=true")
    if sharded and name != "fsdp":
        raise ConfigError(f"checkpoint.sharded=true needs strategy=fsdp (FSDP2), not "
                          f"strategy={name}, whose checkpoints are one consolidated file")
    if name in ("auto", "ddp"):
        return name
    if name == "fsdp":
        return FullyShardedDataParallel(sharded, asynchronous)
    if name == "fsdp1":
        return _fsdp1(model)
    raise ConfigError(f"unknown strategy '{name}'; choose one of {STRATEGIES}")


def _fsdp1(model: Engine) -> FSDPStrategy:
    """FSDP1 flattens each wrapped unit's parameters into one buffer and shards that, so an EMA
    copy only holds the same slice as its source when both are their own units: the backbone
    and the teacher are wrapped whole (around their blocks); averaged heads are refused."""
    if not torch.cuda.is_available():
        raise ConfigError("strategy=fsdp1 (Lightning FSDPStrategy) needs CUDA GPUs; use "
                          "strategy=fsdp (FSDP2), which also runs on CPU")
    objectives = model.objectives() if isinstance(model, Engine) else {}
    averaged = sorted(name for name, objective in objectives.items()
                      if objective.momentum_pairs())
    if averaged:
        raise ConfigError(f"strategy=fsdp1 cannot average the heads of {averaged} shard by "
                          "shard; use strategy=fsdp (FSDP2)")
    return FSDPStrategy(auto_wrap_policy=block_classes(model) | {Backbone},
                        state_dict_type="full")


def consolidated(trainer: Trainer, build: Callable[[], Engine]) -> Engine:
    """The trained model with full weights on every rank, for export and evaluation after
    ``fit`` (which every rank runs on its share of the data): the model itself unless its
    strategy shards it; after a sharded run a fresh ``build()`` holding the weights the
    strategy gathers on rank 0, sent from there to the others. Every rank must call it (the
    gather and the broadcast are collectives)."""
    model = trainer.lightning_module
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        return model
    state = (strategy.full_state_dict() if isinstance(strategy, FullyShardedDataParallel)
             else strategy.lightning_module_state_dict())
    full = build()
    if trainer.is_global_zero:
        full.load_state_dict(state)
    full = full.to(trainer.strategy.root_device)
    for value in full.state_dict().values():
        dist.broadcast(value, src=0)
    return full


def check_launch(trainer: Trainer, multirun: bool) -> None:
    """A job of a local multirun (``-m`` without a cluster launcher) runs inside the sweeping
    process: Lightning would start its other processes by re-running the whole command line,
    sweep included. Multi-process jobs of a sweep need processes started outside (SLURM
    tasks, torchrun)."""
    if multirun and trainer.world_size > 1 and (
            not trainer.strategy.cluster_environment.creates_processes_externally):
        raise ConfigError("a local multirun (-m) cannot start the processes of a "
                          f"{trainer.world_size}-process job: sweep with "
                          "hydra/launcher=slurm, or run each job on its own (torchrun or "
                          "python -m m3i_lightning trainer.devices=...)")
