"""Shared tiny fixtures: a 16 px ViT with 4 px patches and real batches of the embedded digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.data import EmbeddedDigits

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the spinning
# of oversubscribed threads makes a step tens of times slower: tests run single-threaded.
torch.set_num_threads(1)

TINY_VIT = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                num_heads=2)


def tiny_backbone(**overrides) -> Backbone:
    options = {**TINY_VIT, **overrides}
    return Backbone(options.pop("arch"), **options)


@pytest.fixture
def backbone() -> Backbone:
    torch.manual_seed(0)
    return tiny_backbone()


@pytest.fixture(scope="session")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer(context_length=16)


def digits_module(tokenizer, batch_size: int = 8, **kwargs) -> EmbeddedDigits:
    dm = EmbeddedDigits(img_size=16, source_size=16, batch_size=batch_size, num_workers=0,
                        tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str, name: str = "config") -> DictConfig:
    """The Hydra config ``name`` as the command line composes it, at :data:`TINY_VIT` size."""
    tiny = [f"backbone.{k}={v}" for k, v in TINY_VIT.items()]
    tiny += ["data.source_size=16", "data.num_workers=0"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*tiny, *overrides])


@pytest.fixture
def batch(tokenizer) -> dict:
    """One training batch with every field: view1/view2 with geometry, label, text."""
    torch.manual_seed(0)
    return next(iter(digits_module(tokenizer).train_dataloader()))


# Tiny head options of the foundation objectives, so a test can build any of them quickly.
TINY_HEADS = {
    "cls": dict(num_classes=10),
    "clip": dict(proj_dim=32, text_width=32, text_layers=1, text_heads=2),
    "mim_feat": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2),
}


def tiny_objective(name: str, tokenizer, backbone: Backbone | None = None, **overrides):
    """Objective ``name`` with tiny heads: standalone with ``backbone``, else sized for
    :data:`TINY_VIT` and ready to be put in a MultiObjective."""
    from m3i_lightning.config.factory import objective_class

    options = {**TINY_HEADS.get(name, {}), **overrides}
    if name == "clip":
        options["tokenizer"] = tokenizer
    if backbone is not None:
        options["backbone"] = backbone
    else:
        options.setdefault("embed_dim", TINY_VIT["embed_dim"])
        options.setdefault("grid_size", (4, 4))
        options.setdefault("patch_size", TINY_VIT["patch_size"])
    return objective_class(name, options)(**options)


def feature_spread(backbone: Backbone, images: torch.Tensor) -> float:
    """Spread across the batch (mean std) of the normalised, mean-pooled patch features: what
    a collapsed encoder drives to 0. A fresh ViT's class token hardly differs between images,
    so it would say little about collapse."""
    with torch.no_grad():
        features = backbone(images).tokens.mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1).std(dim=0).mean().item()


def fit_fixed_batch(objective, batch: dict, steps: int = 30, lr: float = 1e-3):
    """A plain torch loop on one fixed batch (the same mask every step), the teacher and the
    averaged heads following by the engine's own :meth:`update_teacher`. Returns the loss
    curve and the :func:`feature_spread` of view1 before and after."""
    name = next(iter(objective.objectives()))
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=lr)
    start, losses = feature_spread(objective.backbone, batch["view1"]), []
    for step in range(steps):
        torch.manual_seed(0)
        loss = objective.forward_terms(batch)[0][name]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        objective.update_teacher(step, steps)
    return losses, start, feature_spread(objective.backbone, batch["view1"])


CLIP_TINY = ["objective=[clip]", "objective.clip.text_width=32", "objective.clip.proj_dim=32",
             "objective.clip.text_layers=1", "objective.clip.text_heads=2",
             "text.context_length=32"]  # 32 bytes keep the digit's name in every caption


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory):
    """300 steps of clip alone on the digits (~10 s), saved with its config."""
    import lightning as L

    from m3i_lightning.config.factory import build_datamodule, build_model, build_tokenizer_from
    from m3i_lightning.config.restore import StoreConfig

    cfg = compose_config(*CLIP_TINY, "data.batch_size=64", "optim.lr=2e-3")
    L.seed_everything(0)
    tokenizer = build_tokenizer_from(cfg.text)
    dm = build_datamodule(cfg.data, tokenizer)
    model = build_model(cfg, dm.num_classes, tokenizer)
    dm.fields = model.batch_fields()
    trainer = L.Trainer(max_steps=300, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[StoreConfig(cfg, dm.num_classes)])
    trainer.fit(model, datamodule=dm)
    path = tmp_path_factory.mktemp("clip_run") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path
