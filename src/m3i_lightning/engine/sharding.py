"""Model-side scaling of the engine: activation checkpointing, torch.compile and FSDP2 sharding.

The engine's ``configure_model`` calls :func:`configure`; Lightning runs that hook once the
processes exist, for every strategy, so the same model scales from one CPU to many GPUs.

FSDP2 layout: every block (of the student and the EMA teacher: ViT, Swin or ConvNeXt blocks,
ResNet bottlenecks; of the predictors and the text tower) is its own ``fully_shard`` unit,
then the engine is the root unit holding the rest (embeddings, stems, downsampling layers,
norms, mask tokens, heads). Lightning calls ``training_step``, never ``forward``, so the
steps are registered as the root's forward: the root all-gathers its parameters at the start
of a step. Those are Lightning's step hooks and every method marked :func:`step_method`.
Each parameter is sharded on dim 0 over the same mesh, so the teacher's local shard and the
student's hold the same slice and the EMA update runs on local shards
(:func:`m3i_lightning.engine.teacher.ema_`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

Method = TypeVar("Method", bound=Callable)
_STEP_MARK = "_m3i_step_method"


def step_method(method: Method) -> Method:
    """Mark a method that runs the model outside ``forward`` and Lightning's steps (a monitor's
    pass, pictures): under FSDP2 it is registered as a forward of the root, so it gathers the
    weights. The mark travels with the method, so renaming it keeps it sharded."""
    setattr(method, _STEP_MARK, True)
    return method


def step_methods(model: nn.Module) -> list[str]:
    """Names of the methods of ``model`` that run it: Lightning's step hooks it overrides and
    those marked :func:`step_method`."""
    from lightning.pytorch import LightningModule

    hooks = (LightningModule.training_step, LightningModule.validation_step)
    names = [hook.__name__ for hook in hooks
             if getattr(type(model), hook.__name__, hook) is not hook]
    return names + [name for name in dir(type(model))
                    if getattr(getattr(type(model), name, None), _STEP_MARK, False)]


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Classes of the repeated layers in ``model``: every backbone's blocks (ViT, Swin and
    ConvNeXt blocks, ResNet bottlenecks), the transformer blocks of the dense objectives'
    predictors, and the classes a ``transformers`` model names in ``_no_split_modules`` that
    it stacks in a ``ModuleList`` (its layers, not its embeddings)."""
    from m3i_lightning.backbone import Backbone
    from m3i_lightning.components.predictor import TokenPredictor

    classes: set[type[nn.Module]] = set()
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, Backbone):
            classes |= {type(block) for block in module.blocks()}
        elif isinstance(module, TokenPredictor):
            classes |= {type(block) for block in module.blocks}
        names |= set(getattr(module, "_no_split_modules", None) or ())
    stacked = (layer for m in model.modules() if isinstance(m, nn.ModuleList) for layer in m)
    return classes | {type(layer) for layer in stacked if type(layer).__name__ in names}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    classes = tuple(block_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute the blocks of the timm networks (timm's flag, honoured by every ``Backbone``
    family) and of the ``transformers`` text tower in the backward pass instead of storing their
    activations."""
    for module in model.modules():
        if hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)
        elif getattr(module, "supports_gradient_checkpointing", False):
            module.gradient_checkpointing_enable({"use_reentrant": False})


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block in place: parameter names (and so checkpoints) stay
    unchanged, and the masked, variable-length token sequences outside the blocks stay
    eager. The blocks of a backbone declaring ``static_shapes`` are compiled for fixed shapes."""
    from m3i_lightning.backbone import Backbone

    static = {id(block) for m in model.modules() if isinstance(m, Backbone) and m.static_shapes
              for block in m.blocks()}
    for block in transformer_blocks(model):
        block.compile(dynamic=False if id(block) in static else None)


FSDP_ALL_GATHER_WARNING = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


def shard(model: nn.Module, mesh) -> None:
    """FSDP2: each block one unit, then ``model`` the root (see the module doc).

    The root reshards after each step's forward too (FSDP2 keeps a root's parameters gathered
    by default): a validation step, which has no backward, then leaves no full copy behind,
    and the EMA update and checkpoints always see shards.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 gathers with a collective torch itself deprecates: a warning on every rank that
    # asks nothing of the user
    warnings.filterwarnings("ignore", message=FSDP_ALL_GATHER_WARNING, category=FutureWarning)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for name in step_methods(model):
        register_fsdp_forward_method(model, name)


def configure(model: nn.Module, mesh=None, *, activation_checkpointing: bool = False,
              compile: bool = False) -> None:
    """Apply the scaling options in the order FSDP2 expects (checkpointing, compile, sharding).

    ``mesh`` is the data-parallel device mesh of Lightning's ``ModelParallelStrategy`` (None
    with other strategies: nothing is sharded here). Idempotent, as Lightning asks of
    ``configure_model``.
    """
    if getattr(model, "_scaling_configured", False):
        return
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    if mesh is not None:
        shard(model, mesh)
    model._scaling_configured = True


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: the local shard of an FSDP2 DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

