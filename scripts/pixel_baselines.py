"""What the pixels alone give: the run's own end-of-run protocols (kNN, linear probe) and a
logistic regression on the flattened pixels of the held-out split that a run is scored on.

    python scripts/pixel_baselines.py [OVERRIDES ...]      # e.g. experiment=cpu/m3i data=...

The data and its split come from the pre-training config the overrides compose (the whole
images at the backbone's size, in the views' normalised space, as evaluation reads them); the
kNN and the probe take the config's ``knn`` and ``probe`` settings (``evaluate`` of
:mod:`m3i_lightning.evaluation.protocols`, the features being the pixels); the logistic
regression is scikit-learn's (L-BFGS, C=1, on standardised pixels). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from m3i_lightning.conf import CONF_DIR
from m3i_lightning.config.factory import build_datamodule, build_tokenizer_from
from m3i_lightning.evaluation.knn import extract_features
from m3i_lightning.evaluation.protocols import TrainedModel, describe_data, evaluate


class Pixels(nn.Module):
    """A 'backbone' whose global feature is the image's flattened pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # where evaluation finds the device

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(global_feature=images.flatten(1))


def main(argv: list[str] | None = None) -> dict:
    torch.set_num_threads(1)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=sys.argv[1:] if argv is None else argv)
    data = build_datamodule(cfg.data, build_tokenizer_from(cfg.text))
    data.setup("fit")
    pixels = Pixels()
    evaluation = evaluate(TrainedModel(pixels), data, OmegaConf.to_container(cfg.knn),
                          OmegaConf.to_container(cfg.probe))
    (x, y), (vx, vy) = (extract_features(pixels, data.eval_dataloader(s)) for s in ("train", "val"))
    scaler = StandardScaler().fit(x.numpy())
    logistic = LogisticRegression(max_iter=2000).fit(scaler.transform(x.numpy()), y.numpy())
    result = {"data": describe_data(cfg.data), "img_size": cfg.backbone.img_size,
              "samples": evaluation.sizes, **evaluation.results,
              "logistic_top1": float(logistic.score(scaler.transform(vx.numpy()), vy.numpy()))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
