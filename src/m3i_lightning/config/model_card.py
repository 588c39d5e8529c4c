"""The model card of an exported folder: its ``README.md``, which the Hugging Face Hub shows
and reads metadata from.

Written from the training config (objectives and their weights, data, budget), the run's
evaluation table (``eval.json``) when there is one, and a snippet that loads the folder with
timm alone. The licence is left to the user: the metadata names none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from m3i_lightning.config.artifacts import IMAGE_TEXT_FILE
from m3i_lightning.evaluation.protocols import Evaluation, describe_data, format_table

CARD_FILE = "README.md"
TAGS = ("image-feature-extraction", "timm", "m3i_lightning", "self-supervised-learning")
PLACEHOLDER_REPO = "<org>/<name>"


def model_card(config: Mapping | None, evaluation: Mapping | None = None,
               repo_id: str | None = None, image_text: str | None = None) -> str:
    """The card's Markdown, with its YAML metadata block.

    Args:
        config: the training config (a checkpoint's); None for a folder of unknown origin.
        evaluation: the content of the run's ``eval.json``; its table goes into the card.
        repo_id: the Hub repository the folder is pushed to, named in the usage snippet.
        image_text: the image-text objective whose text side the folder holds (``clip``).

    Example:
        >>> card = model_card(None, repo_id="me/vit")
        >>> card.splitlines()[1]
        'library_name: timm'
    """
    cfg = OmegaConf.create(dict(config)) if config is not None else None
    objectives = dict(cfg.objective) if cfg is not None else {}
    repo = repo_id or PLACEHOLDER_REPO
    tags = [*TAGS, *objectives]
    lines = ["---", "library_name: timm", "tags:", *(f"- {tag}" for tag in tags),
             "# license: choose one (https://hf.co/docs/hub/repositories-licenses)", "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else 'm3i_lightning backbone'}", "",
             "Pre-trained with m3i_lightning (composable visual pre-training objectives, "
             "M3I, CVPR 2023): a backbone loadable with timm alone."]
    if cfg is not None:
        lines += ["", "## Training", "", *training_lines(cfg, objectives)]
    if evaluation:
        lines += ["", "## Evaluation", "", evaluation_table(evaluation)]
    lines += ["", "## Usage", "", *usage_lines(repo, image_text)]
    return "\n".join(lines) + "\n"


def training_lines(cfg, objectives: Mapping) -> list[str]:
    """The objectives and their weights, the backbone, the data and the budget."""
    rows = ["| objective | weight |", "|---|---|"]
    rows += [f"| `{name}` | {options.get('weight', 1.0)} |" for name, options in objectives.items()]
    trainer = cfg.trainer
    bounds = [f"{trainer.max_steps} steps" if trainer.get("max_steps", -1) >= 0 else None,
              f"{trainer.max_epochs} epochs" if trainer.get("max_epochs") is not None else None]
    batch = cfg.get("global_batch_size") or f"{cfg.data.batch_size} per process"
    options = {"input": cfg.get("input"), "mix": cfg.get("mix"),
               "mask.ratio": cfg.mask.ratio if "mask" in cfg else None}
    return [*rows, "",
            f"- backbone: `{cfg.backbone.arch}` at {cfg.backbone.get('img_size')} px",
            f"- data: `{describe_data(cfg.data)}`",
            f"- budget: {' / '.join(b for b in bounds if b) or 'unbounded'}, batch {batch}",
            "- options: " + ", ".join(f"`{key}={json.dumps(value)}`"
                                      for key, value in options.items() if value is not None)]


def evaluation_table(record: Mapping) -> str:
    """The table of ``eval.json`` as the run printed it."""
    evaluation = Evaluation(dict(record["results"]), dict(record["data"]["samples"]))
    return format_table(evaluation, record["knn"], record["probe"], record["data"]["config"],
                        record.get("segmentation"))


def usage_lines(repo: str, image_text: str | None) -> list[str]:
    lines = ["```python", "import timm", "", f'model = timm.create_model("hf-hub:{repo}", '
             "pretrained=True)  # or local-dir:<folder>",
             "features = model(images)  # [B, 3, H, W] -> pooled features; "
             "model.forward_features(images): tokens", "```"]
    if image_text:
        lines += ["", f"The folder's `{image_text}/` holds the text tower and tokenizer of the "
                  "image-text objective; with m3i_lightning installed, "
                  "`python -m m3i_lightning.eval backbone_dir=<folder> protocols=[zero_shot]` "
                  "uses them (`m3i_lightning.config.artifacts.load_exported(<folder>)` "
                  "rebuilds both towers in Python)."]
    return lines


def write_model_card(folder: str | Path, config: Mapping | None,
                     eval_file: str | Path | None = None, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md``; the evaluation table comes from ``eval_file`` when that file
    exists, the image-text objective from the folder's ``image_text.json``.

    Args:
        folder: an exported folder.
        config: the training config, or None.
        eval_file: the run's ``eval.json``.
        repo_id: the Hub repository named in the usage snippet.
    """
    folder = Path(folder)
    evaluation = None
    if eval_file is not None and Path(eval_file).is_file():
        evaluation = json.loads(Path(eval_file).read_text())
    record = folder / IMAGE_TEXT_FILE
    image_text = json.loads(record.read_text())["objective"] if record.is_file() else None
    path = folder / CARD_FILE
    path.write_text(model_card(config, evaluation, repo_id, image_text))
    return path

