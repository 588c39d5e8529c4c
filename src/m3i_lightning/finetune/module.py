"""The fine-tuning LightningModule: a pre-trained ViT, global average pooling and a fresh
linear head, trained end to end with the MAE / BEiT / SiameseIM recipe."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.batch_mixup import BatchMixup
from m3i_lightning.components.optim import warmup_cosine
from m3i_lightning.core.shares import valid_rows
from m3i_lightning.engine import sharding
from m3i_lightning.engine.teacher import ema_
from m3i_lightning.finetune.layer_decay import layer_decay_groups

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head: near zero, so early steps keep the features


@dataclass
class Recipe:
    """Optimisation and regularisation of one fine-tuning run (``conf/finetune/*.yaml``).

    ``lr``: the peak rate of the head (layer L + 1); ``warmup_epochs`` then a cosine decay
    to ``min_lr``, per step. ``mixup`` / ``cutmix``: the Beta parameters of timm's Mixup (both
    0: off, and ``smoothing`` is plain label smoothing). ``ema``: the decay of an exponential
    moving average of the weights, evaluated alongside (None: none).
    """

    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5
    min_lr: float = 1e-6
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    ema: float | None = None


class Classifier(nn.Module):
    """Backbone (its timm pooling: ``global_pool=avg`` averages the patch tokens, then
    ``fc_norm``) and a linear head on the pooled feature."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images).global_feature)


REDUCED_ADVICE = r"It is recommended to use `self\.log\('val/(ema_)?(top1|top5|loss|images)'"


class FineTuning(L.LightningModule):
    """Supervised end-to-end training of a :class:`Classifier`.

    Logs ``train/loss``, and after every validation epoch ``val/top1`` and ``val/top5`` over
    the held-out split (``val/ema_top1`` / ``val/ema_top5`` for the averaged weights). The
    validation batches are each rank's equal share (:mod:`m3i_lightning.core.shares`): padding rows
    are not counted, so the figures are those of one process over the whole split.
    """

    def __init__(self, classifier: Classifier, recipe: Recipe | None = None) -> None:
        super().__init__()
        # the validation figures are reduced over ranks by hand: Lightning's sync_dist advice
        # does not apply to them
        warnings.filterwarnings("ignore", message=REDUCED_ADVICE)
        self.recipe = recipe or Recipe()
        self.classifier = classifier
        self.num_classes = classifier.head.out_features
        self.ema = None
        if self.recipe.ema is not None:
            self.ema = copy.deepcopy(classifier).requires_grad_(False).eval()
        r = self.recipe
        self.mixup = None
        if r.mixup > 0 or r.cutmix > 0:
            self.mixup = BatchMixup(r.mixup, r.cutmix, self.num_classes,
                                    smoothing=r.smoothing)
        self.soft_loss = SoftTargetCrossEntropy()
        self._tallies: dict[str, Tensor] = {}

    @property
    def depth(self) -> int:
        return len(self.classifier.backbone.model.blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images)

    def on_fit_start(self) -> None:
        """Identical weights on every rank, then each rank its own drop-path draws (Mixup's λ
        comes from NumPy's stream, the same on every rank, as for one global batch)."""
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["view1"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            loss = self.soft_loss(self.classifier(images), targets)
        else:
            loss = F.cross_entropy(self.classifier(images), labels,
                                   label_smoothing=self.recipe.smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keep = valid_rows(batch).to(self.device)
        labels = batch["label"][keep]
        models = {"": self.classifier, "ema_": self.ema}
        for prefix, model in models.items():
            if model is None:
                continue
            logits = model(batch["image"])[keep]
            top5 = logits.topk(min(5, self.num_classes), dim=-1).indices
            hits = top5 == labels.unsqueeze(-1)
            counts = torch.stack([hits[:, 0].sum(), hits.any(-1).sum(),
                                  F.cross_entropy(logits, labels, reduction="sum"),
                                  torch.tensor(len(labels), device=self.device)]).double()
            self._tallies[prefix] = self._tallies.get(prefix, 0) + counts

    def on_validation_epoch_end(self) -> None:
        tallies, self._tallies = self._tallies, {}
        if self.trainer.sanity_checking:
            return
        for prefix, counts in tallies.items():
            if self.trainer.world_size > 1:
                counts = self.all_gather(counts).sum(0)
            top1, top5, loss, total = counts.tolist()
            self.log_dict({f"val/{prefix}top1": top1 / total, f"val/{prefix}top5": top5 / total,
                           f"val/{prefix}loss": loss / total}, prog_bar=not prefix)
        if tallies:
            self.log("val/images", float(total))  # the held-out images scored

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            with torch.no_grad():
                ema_(self.ema, self.classifier, self.recipe.ema)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, FSDP2: each transformer block (of the model and of
        its EMA, alike, so the average runs on local shards) one unit, this module the root."""
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        sharding.configure(self, mesh)

    def configure_optimizers(self):
        r = self.recipe
        groups = layer_decay_groups(self.classifier, self.depth, r.lr, r.layer_decay,
                                    r.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=r.lr, betas=tuple(r.betas))
        total = int(self.trainer.estimated_stepping_batches)
        self.trainer.fit_loop.setup_data()  # the epoch length, also when max_steps ends the run
        per_epoch = math.ceil(self.trainer.num_training_batches
                              / self.trainer.accumulate_grad_batches)
        warmup = int(r.warmup_epochs * per_epoch)
        min_ratio = r.min_lr / r.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
