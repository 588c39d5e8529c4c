"""An image-text objective is one class file plus one YAML: a SigLIP-like head written here
(never imported by the library) trains through the pre-training command, and the eval and
export commands serve it, zero-shot and text side, by its capability alone."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from helpers import TINY_RUN, compose_config, run

from m3i_lightning.commands import export as export_command
from m3i_lightning.commands.eval import evaluate_command
from m3i_lightning.config import artifacts
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.zeroshot import class_embeddings
from m3i_lightning.objectives import OBJECTIVES

NAME = "pairwise_sigmoid"

# The class file: a sigmoid over every image-caption pair (SigLIP's form), a mean of token
# embeddings as its text tower, its text side saved as one safetensors file and the tokenizer.
CLASS_FILE = '''
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from m3i_lightning.objectives.base import Objective
from m3i_lightning.objectives.capabilities import ImageText, load_tokenizer, save_tokenizer

HEAD_FILE = "head.safetensors"


class PairwiseSigmoid(Objective, ImageText):
    name = "pairwise_sigmoid"
    form = "Boltzmann"
    target_repr = "paired text"
    reads_global_feature = True
    requires = frozenset({"text"})
    min_batch_size = 2

    def __init__(self, tokenizer, proj_dim: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, proj_dim)
        self.image_proj = nn.Linear(self.embed_dim, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), 2.3))
        self.logit_bias = nn.Parameter(torch.full((1,), -5.0))

    def _text(self, ids, mask):
        mask = mask.unsqueeze(-1).float()
        return F.normalize((self.token_embedding(ids) * mask).sum(1) / mask.sum(1), dim=-1)

    def embed_texts(self, texts):
        tokens = self.tokenizer(texts)
        device = self.image_proj.weight.device
        return self._text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

    def embed_images(self, features):
        return F.normalize(self.image_proj(features), dim=-1)

    def save_text_side(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tokenizer(self.tokenizer, folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  folder / HEAD_FILE)

    @classmethod
    def load_text_side(cls, folder, *, embed_dim, grid_size, patch_size):
        state = load_file(Path(folder) / HEAD_FILE)
        head = cls(load_tokenizer(Path(folder)), proj_dim=state["image_proj.weight"].shape[0],
                   embed_dim=embed_dim, grid_size=grid_size, patch_size=patch_size)
        head.load_state_dict(state)
        return head

    def loss(self, batch, encoded, targets):
        image = self.embed_images(encoded.global_feature)
        text = self._text(batch["text"], batch["text_mask"])
        logits = self.logit_scale.exp() * image @ text.T + self.logit_bias
        signs = 2 * torch.eye(len(image), device=image.device) - 1
        return -F.logsigmoid(signs * logits).sum() / len(image), {}
'''

YAML = f"# @package objective.{NAME}\nweight: 1.0\nproj_dim: 8\n"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The class file importable (and imported here, as a user's own module is) and its YAML
    in a config folder for ``hydra.searchpath``; unregistered afterwards."""
    code = tmp_path / "plugin"
    (code / "conf" / "objective").mkdir(parents=True)
    (code / f"{NAME}.py").write_text(CLASS_FILE)
    (code / "conf" / "objective" / f"{NAME}.yaml").write_text(YAML)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(OBJECTIVES, NAME, raising=False)
    module = importlib.import_module(NAME)
    yield code, module
    OBJECTIVES.pop(NAME, None)
    sys.modules.pop(NAME, None)


def test_an_image_text_objective_in_one_file_and_one_yaml_is_trained_evaluated_and_exported(
        plugin, tmp_path):
    code, module = plugin
    run_dir = tmp_path / "run"
    options = [o for o in TINY_RUN if o != "export=false"]
    run(*options, f"objective=[{NAME}]", f"hydra.searchpath=[file://{code / 'conf'}]",
        "trainer.max_steps=2", "data.batch_size=16", f"hydra.run.dir={run_dir}",
        prelude=f"import sys\nsys.path.insert(0, {str(code)!r})\nimport {NAME}")
    # the run's own end: the text side exported by its config name, zero-shot scored
    exported = run_dir / "backbone"
    assert json.loads((exported / artifacts.IMAGE_TEXT_FILE).read_text()) == {"objective": NAME}
    assert (exported / NAME / module.HEAD_FILE).is_file()
    assert "zero_shot_top1" in json.loads((run_dir / "eval.json").read_text())["results"]

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    scores = {}
    for source in (f"checkpoint={checkpoint}", f"backbone_dir={exported}"):
        cfg = compose_config(source, "protocols=[zero_shot]", name="eval")
        scores[source] = evaluate_command(cfg, tmp_path / source.split("=")[0])["zero_shot_top1"]
    assert len(set(scores.values())) == 1, scores  # the exported head is the trained one

    export_command.main([f"checkpoint={checkpoint}", f"out={tmp_path / 'export'}"])
    restored = artifacts.load_exported(tmp_path / "export").image_text
    trained = load_checkpoint(checkpoint).image_text
    assert type(restored) is type(trained) is module.PairwiseSigmoid
    prompts = [["a handwritten digit one"], ["a handwritten digit two", "two"]]
    assert torch.equal(class_embeddings(restored, prompts), class_embeddings(trained, prompts))

    OBJECTIVES.pop(NAME)  # a reader that never imported the class file is told what to do
    with pytest.raises(ConfigError, match=f"objective '{NAME}', which is not registered"):
        artifacts.load_exported(exported)
