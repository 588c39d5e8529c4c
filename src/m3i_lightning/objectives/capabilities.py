"""Capabilities a head may offer beyond its loss, found by ``isinstance`` rather than by name.

Evaluation, export and restore ask a run's heads what they can do, so a new objective with an
existing capability (an image-text loss such as SigLIP's beside CLIP's) is still one class file
plus its YAML: nothing outside this package names it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import Tensor

from m3i_lightning.components.text import ByteTokenizer, build_tokenizer

TOKENIZER_FILE = "m3i_tokenizer.json"  # how a saved text side rebuilds its tokenizer


class ImageText(ABC):
    """A head that embeds images and texts in one joint space (CLIP and its kin): what
    zero-shot classification, the export and the restore need from it, whatever its loss.

    Mixed into an :class:`~m3i_lightning.objectives.base.Objective` (an ``nn.Module``), e.g.
    ``class CLIP(Objective, ImageText)``; ``tokenizer`` turns captions and prompts into the ids
    its text side reads (the data tokenizes the training captions with the same one).
    """

    tokenizer: object

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """[N, D] unit-norm joint-space embeddings of ``texts``, on the head's device."""

    @abstractmethod
    def embed_images(self, features: Tensor) -> Tensor:
        """[N, D] unit-norm joint-space embeddings of the backbone's global features
        [N, embed_dim] (on the head's device)."""

    @abstractmethod
    def save_text_side(self, folder: Path) -> None:
        """Write into ``folder`` (created) everything :meth:`load_text_side` needs: the text
        tower, its tokenizer (:func:`save_tokenizer`) and the image side's projection."""

    @classmethod
    @abstractmethod
    def load_text_side(cls, folder: Path, *, embed_dim: int, grid_size: tuple[int, int],
                       patch_size: int) -> ImageText:
        """The head back from a folder of :meth:`save_text_side`, for a backbone of these sizes.

        Raises:
            OSError, ValueError: a file is missing, unreadable or holds other weights.
        """


def find_image_text(heads: Iterable[object]) -> ImageText | None:
    """The first of ``heads`` offering :class:`ImageText` (a run's objectives in their config
    order), None when none does."""
    return next((head for head in heads if isinstance(head, ImageText)), None)


def image_text_objectives() -> list[str]:
    """Config names of the registered objectives offering :class:`ImageText`, for messages."""
    from m3i_lightning.objectives import OBJECTIVES

    return sorted(name for name, cls in OBJECTIVES.items() if issubclass(cls, ImageText))


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Describe ``tokenizer`` in ``folder``: the byte tokenizer by its context length alone, a
    ``transformers`` one also by its own files (``save_pretrained``)."""
    if isinstance(tokenizer, ByteTokenizer):
        name = "byte"
    else:
        tokenizer.tokenizer.save_pretrained(folder)
        name = "."
    spec = {"tokenizer": name, "context_length": tokenizer.context_length}
    (folder / TOKENIZER_FILE).write_text(json.dumps(spec, indent=2))


def load_tokenizer(folder: Path):
    """The tokenizer :func:`save_tokenizer` described in ``folder``."""
    spec = json.loads((folder / TOKENIZER_FILE).read_text())
    name = "byte" if spec["tokenizer"] == "byte" else str(folder / spec["tokenizer"])
    return build_tokenizer(name, spec["context_length"])
