"""``data=torchvision data.name=<class>``: a dataset class of ``torchvision.datasets`` (CIFAR10,
CIFAR100, STL10, Food101, FashionMNIST, ImageNet, ...) as the data of a run.

The class reads its own files under ``data.root`` (downloading them there with
``data.download=true`` where the class can and the internet is reachable). Labels and splits are
the class's: a ``train`` flag (CIFAR, MNIST) gives train / held-out by ``train=True/False``; a
``split`` argument (STL10, Food101, ImageNet) gives ``data.split`` and ``data.val_split``
(default: the class's ``val``, else its ``test`` split). Captions are written from the class
names with ``data.caption_templates``.

Classes that take a ``loader`` (ImageNet, Food101, Flowers102 ...) hand over file paths, so
JPEGs decode in the workers at the reduced scale the views allow (``data.images``); the others
give decoded PIL images.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

from m3i_lightning.core.errors import ConfigError, EmptySplitError
from m3i_lightning.data.dataset import ViewDataset
from m3i_lightning.data.images import EncodedImage
from m3i_lightning.data.module import ViewDataModule, require_usable

log = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("val", "test")  # tried in this order when data.val_split is null
LABEL_ATTRIBUTES = ("targets", "labels")  # where torchvision classes keep every label


def file_path(path: str) -> str:
    """The ``loader`` given to classes that take one: the file is read later, by the view."""
    return path


def dataset_class(name: str | None):
    """``torchvision.datasets.<name>``, checked to be a dataset class."""
    import torchvision.datasets
    from torch.utils.data import Dataset

    if not name:
        raise ConfigError("data=torchvision needs data.name=<torchvision dataset class>, e.g. "
                          "CIFAR10, STL10, Food101, FashionMNIST, ImageNet")
    cls = getattr(torchvision.datasets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Dataset)):
        known = sorted(n for n, c in vars(torchvision.datasets).items()
                       if inspect.isclass(c) and issubclass(c, Dataset) and not n.startswith("_"))
        raise ConfigError(f"data.name={name} is no torchvision dataset class; e.g. "
                          f"{', '.join(known[:12])} ...")
    return cls


def open_split(cls, root: Path, split: str | bool, download: bool, probing: bool = False):
    """The class's dataset of ``split`` (True / False for a ``train`` flag); the class's own
    complaint (files missing, split unknown) becomes one :class:`ConfigError`, except an
    unknown split while ``probing`` (torchvision's ValueError, raised before any file is
    read)."""
    from torchvision.datasets import DatasetFolder

    parameters = inspect.signature(cls.__init__).parameters
    options: dict = {"train": split} if isinstance(split, bool) else {"split": split}
    if download:
        if "download" not in parameters:
            raise ConfigError(f"{cls.__name__} cannot download: put its files under "
                              f"data.root={root} and set data.download=false")
        options["download"] = True
    if "loader" in parameters or issubclass(cls, DatasetFolder):
        options["loader"] = file_path
    try:
        return cls(str(root), **options)
    except ValueError:
        if probing:
            raise
        raise ConfigError(f"{cls.__name__} has no split '{split}' (data.split / "
                          "data.val_split)") from None
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"data.name={cls.__name__} under data.root={root}: "
                          f"{str(err).splitlines()[0]} (data.download=true fetches what the "
                          "class can download)") from None


def held_out_split(cls, root: Path, split: str | None, download: bool):
    """(the held-out dataset, its split's name): ``split``, else the class's val or test."""
    if split is not None:
        return open_split(cls, root, split, download), split
    for name in HELD_OUT_SPLITS:
        try:
            return open_split(cls, root, name, download, probing=True), name
        except ValueError:  # torchvision's check of the split argument
            continue
    raise ConfigError(f"{cls.__name__} has no {' or '.join(HELD_OUT_SPLITS)} split: name its "
                      "held-out split with data.val_split")


def labels_of(dataset) -> list[int | None]:
    """Every sample's label (None where the class says "no label", e.g. -1 in STL10's
    unlabeled split): from the class's label list, else read sample by sample."""
    found = next((getattr(dataset, a) for a in LABEL_ATTRIBUTES if hasattr(dataset, a)), None)
    if found is None:
        found = [dataset[i][1] for i in range(len(dataset))]
    labels = [int(label) for label in found]
    return [label if label >= 0 else None for label in labels]


def class_names_of(dataset, labels: Sequence[int | None]) -> list[str]:
    """The class names in label order: the class's ``classes`` (the first synonym where it
    lists several, as ImageNet does), else the label numbers."""
    classes = getattr(dataset, "classes", None)
    if classes:
        return [c if isinstance(c, str) else c[0] for c in classes]
    return [str(i) for i in range(max((x for x in labels if x is not None), default=-1) + 1)]


class TorchvisionSource:
    """(image, label, caption) of one split; the image is a file path or a PIL image, read
    and decoded by the view (in a DataLoader worker)."""

    def __init__(self, dataset, labels: Sequence[int | None], names: Sequence[str],
                 templates: Sequence[str] | None, indices: Sequence[int] | None = None) -> None:
        self.dataset, self.labels, self.names, self.templates = dataset, labels, names, templates
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image = self.dataset[index][0]
        label = self.labels[index]
        caption = (self.templates[index % len(self.templates)].format(self.names[label])
                   if self.templates and label is not None else None)
        return EncodedImage(image, f"{type(self.dataset).__name__}[{index}]"), label, caption

    def labelled(self) -> TorchvisionSource:
        """The samples that have a label."""
        kept = [i for i in self.indices if self.labels[i] is not None]
        return TorchvisionSource(self.dataset, self.labels, self.names, self.templates, kept)


class TorchvisionData(ViewDataModule):
    """The dataset class ``name`` of ``torchvision.datasets`` under ``root``; see the module
    docstring for its splits, labels and captions.

    Args:
        name: the class, e.g. ``"CIFAR10"``, ``"STL10"``, ``"FashionMNIST"``, ``"ImageNet"``.
        root: the folder the class reads (and downloads into).
        download: let the class download its files into ``root``.
        split: the training split of a class with a ``split`` argument (``train``;
            STL10's ``train+unlabeled`` for pre-training).
        val_split: the held-out split; None: ``train=False``, or the class's val / test split.
        caption_templates: captions, ``{}`` standing for the class name; sample ``i`` takes
            template ``i mod len``; every template is a zero-shot prompt.
        labels: False ignores the labels (and the captions written from them).
        captions: False writes no captions.

    The other options (``img_size``, ``batch_size``, ``crop_scale``, ``augment`` ...) build the
    views and the loader as for :class:`~m3i_lightning.data.imagefolder.ImageFolderData`.

    Example:
        >>> data = TorchvisionData("CIFAR10", root="~/data", download=True,
        ...                        img_size=32)  # doctest: +SKIP
        >>> data.class_names[:2]  # doctest: +SKIP
        ['airplane', 'automobile']
    """

    def __init__(self, name: str | None = None, root: str | None = None, download: bool = False,
                 split: str = "train", val_split: str | None = None,
                 caption_templates: Sequence[str] = ("a photo of a {}.",), labels: bool = True,
                 captions: bool = True, img_size: int = 32, batch_size: int = 128,
                 num_workers: int = 2, crop_scale: Sequence[float] = (0.2, 1.0),
                 flip: bool = True, seed: int = 0, tokenizer=None,
                 fields: set[str] | None = None, local_crops: dict | None = None,
                 augment: str = "none", repeated_aug: int = 1, augment_on: str = "workers",
                 decode_size: int | None = 320, interpolation: str = "bilinear",
                 train_view=None) -> None:
        super().__init__(img_size, batch_size, num_workers, crop_scale, flip, tokenizer, fields,
                         seed, 0.0, local_crops, augment, repeated_aug, augment_on,
                         decode_size, interpolation, train_view)
        cls = dataset_class(name)
        if not root:
            raise ConfigError(f"data=torchvision needs data.root=<folder of {name}'s files>")
        folder = Path(root).expanduser()
        flag = "train" in inspect.signature(cls.__init__).parameters
        train = open_split(cls, folder, True if flag else split, download)
        if flag:
            val, val_name = open_split(cls, folder, False, download), "train=False"
        else:
            val, val_name = held_out_split(cls, folder, val_split, download)
        if not len(train):
            raise ConfigError(f"{name} under {folder} has no training sample")
        require_usable(((train[i][0], None, None, f"{name}[{i}]") for i in range(len(train))),
                       f"{name} under {folder}")
        templates = list(caption_templates) if captions and labels else None
        datasets = {"train": train, "val": val}
        found = {key: labels_of(dataset) if labels else [None] * len(dataset)
                 for key, dataset in datasets.items()}
        names = class_names_of(train, found["train"]) if labels else []
        self.splits = {key: TorchvisionSource(dataset, found[key], names, templates)
                       for key, dataset in datasets.items()}
        self.templates, self.val_name = list(caption_templates), val_name
        log.info("data=torchvision %s: %d training and %d held-out (%s) samples, %d classes",
                 name, len(train), len(val), val_name, len(names))
        self.announce(names or None, templates is not None)

    def class_prompts(self) -> list[list[str]]:
        """Zero-shot prompts: every caption template, written for each class in label order."""
        return [[template.format(name) for template in self.templates]
                for name in self.class_names]

    def held_out_options(self) -> str:
        return f"labelled samples in the held-out split ({self.val_name}; data.val_split)"

    def train_dataloader(self):
        return self.loader(ViewDataset(self.splits["train"], self.view, self.fields),
                           train=True)

    def eval_dataloader(self, split: str, rank: int = 0, world_size: int = 1):
        """Whole labelled images of ``train`` or ``val``, for kNN / linear probes (a sampler
        splits them between ranks)."""
        labelled = self.splits[split].labelled()
        if not len(labelled):
            needed = self.held_out_options() if split == "val" else "labelled samples"
            raise EmptySplitError(f"the {split} split has no labelled sample; evaluation needs "
                                  f"{needed}")
        return self.loader(ViewDataset(labelled, self.view, {"label"}, train=False),
                           train=False)
