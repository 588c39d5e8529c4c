"""The encoder interface every objective reads, and the family a timm architecture belongs to.

Every family yields the same :class:`Encoded`: tokens on the last stage's grid (flattened
row-major, one per cell of ``grid_size``, each covering ``patch_size`` pixels: the final
stride), a global feature, and which cells were visible / masked. Dense targets (pixels,
teacher features), masks and M3I's mix all live on that grid, so objectives never ask which
family they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import timm
from timm.layers import to_2tuple
from torch import Tensor, nn

from m3i_lightning.core.encoded import Encoded, Part


class Backbone(nn.Module):
    """A timm network as the student encoder f_θ, built by :meth:`create` (``arch``,
    ``img_size=...``, ``**timm_kwargs``) as the class of its family (:attr:`FAMILIES`), e.g. a
    ``VisionTransformerBackbone``. ``Backbone(arch, ...)`` is the same call, kept for users: like
    ``pathlib.Path``, the base class returns an instance of the family it finds.

    The timm name and keyword arguments are kept (``arch``, ``timm_kwargs``), so the weights
    (``model``, a plain timm network) are exported and re-created with
    ``timm.create_model(arch, **timm_kwargs)``. ``img_size`` is the training resolution: a timm
    argument where the class takes one (ViT, Swin), else only the backbone's own.

    What a family supports is declared, so the engine refuses an objective it cannot serve
    before training: ``supports_masking`` (masked input: masked modelling, M3I's mix) and
    ``supports_dense`` (tokens meant for dense objectives), ``supports_top_blocks`` (the
    outputs of the last blocks, :attr:`Encoded.top_blocks`, from ``forward(..., top_blocks=K)``),
    ``masks_by_token`` (hidden cells encoded as a mask token rather than dropped, their outputs
    in :attr:`Encoded.masked_tokens`), ``supports_class_attention``
    (:attr:`Encoded.class_attention`, from ``forward(..., class_attention=True)``; a ViT with a
    class token).

    Args:
        arch: a timm architecture (``vit_base_patch16_224``, ``convnext_tiny``,
            ``swin_tiny_patch4_window7_224``, ``resnet50`` ...).
        img_size: the training resolution.
        **timm_kwargs: keyword arguments of the timm model (``patch_size``, ``depth``,
            ``drop_path_rate`` ...) and the family's own options (a ViT's ``mask_token``,
            ``position_embedding``, ``init``, ``freeze_patch_embed``).

    Example:
        >>> import torch
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> type(backbone).__name__, backbone.embed_dim, backbone.grid_size
        ('VisionTransformerBackbone', 192, (8, 8))
        >>> backbone(torch.randn(2, 3, 32, 32)).tokens.shape  # the Encoded contract
        torch.Size([2, 64, 192])
    """

    family: ClassVar[str]
    timm_class: ClassVar[type[nn.Module]]
    timm_modules: ClassVar[tuple[str, ...]]  # timm's modules whose models are of this family
    timm_takes_img_size: ClassVar[bool] = True
    supports_masking: ClassVar[bool] = True
    supports_dense: ClassVar[bool] = True
    supports_top_blocks: ClassVar[bool] = False
    masks_by_token: bool = False
    supports_class_attention: bool = False  # per network: a ViT without class token has none
    # torch.compile the blocks for static shapes: a block class whose instances see other
    # shapes (ConvNeXt's stages) makes inductor guess symbolic channel counts it then fails on.
    static_shapes: ClassVar[bool] = True
    FAMILIES: ClassVar[dict[str, type[Backbone]]] = {}  # family name -> class

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in vars(cls):
            Backbone.FAMILIES[cls.family] = cls

    @classmethod
    def create(cls, arch: str, **kwargs) -> Backbone:
        """The backbone of timm architecture ``arch``: an instance of its family's class, which
        must be ``cls`` or below it; ``kwargs`` as for ``__init__``."""
        family = family_of(arch)
        if not issubclass(family, cls):
            raise ValueError(f"'{arch}' is of the {family.family} family, not a {cls.__name__}")
        return family(arch, **kwargs)

    def __new__(cls, arch: str = "vit_tiny_patch16_224", *args, **kwargs):
        # ``Backbone(arch, ...)``: the family's class, whose __init__ Python then runs as
        # :meth:`create` would; a family class (and unpickling) builds itself.
        return super().__new__(family_of(arch) if cls is Backbone else cls)

    def __init__(self, arch: str = "vit_tiny_patch16_224", img_size: int | Sequence[int] = 224,
                 **timm_kwargs) -> None:
        super().__init__()
        self.arch = arch
        self.img_size: tuple[int, int] = tuple(to_2tuple(img_size))
        self.timm_kwargs = {"num_classes": 0, **timm_kwargs}
        if self.timm_takes_img_size:
            self.timm_kwargs["img_size"] = img_size
        self.model = timm.create_model(arch, pretrained=False, **self.timm_kwargs)
        if not isinstance(self.model, self.timm_class):
            raise ValueError(f"'{arch}' builds a {type(self.model).__name__}, not the "
                             f"{self.timm_class.__name__} of the {self.family} family")
        self.embed_dim: int = self.model.num_features
        self.patch_size: int = self.final_stride()
        self.grid_size: tuple[int, int] = self.grid_for(self.img_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]

    def final_stride(self) -> int:
        """Pixels per final-grid cell along each side."""
        return self.model.feature_info[-1]["reduction"]

    def grid_for(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """The final grid of an image of ``image_size`` pixels (e.g. a multi-crop view)."""
        size = tuple(to_2tuple(image_size))
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"'{self.arch}': image size {size} is not a multiple of the final "
                             f"stride {self.patch_size}")
        return size[0] // self.patch_size, size[1] // self.patch_size

    def blocks(self) -> list[nn.Module]:
        """The repeated layers: the units of FSDP2 sharding and of compilation."""
        raise NotImplementedError

    def filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A foreign checkpoint's weights in this timm class's layout (timm's own converter)."""
        return state

    def embed(self, images: Tensor) -> Tensor:
        """The patch embedding: where masks and M3I's mix act."""
        raise NotImplementedError

    def encode_parts(self, parts: Sequence[Part]) -> list[Tensor]:
        """One network pass over the visible cells of every part (M3I's mix: images A and B);
        each part's tokens come back in the order of its visible index."""
        raise NotImplementedError

    def pool(self, tokens: Tensor) -> Tensor:
        """Global feature of a group of final-grid tokens [B, K, D]: M3I's mixed input pools
        each image over its own tokens."""
        raise NotImplementedError

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None) -> Encoded:
        raise NotImplementedError


def timm_module(arch: str) -> str:
    """The timm module defining ``arch`` (``convnext``, ``vision_transformer``, ...)."""
    if arch not in timm.list_models():
        raise ValueError(f"unknown timm architecture '{arch}'")
    return timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]


def family_of(arch: str) -> type[Backbone]:
    """The backbone class of timm architecture ``arch``."""
    module = timm_module(arch)
    for family in Backbone.FAMILIES.values():
        if module in family.timm_modules:
            return family
    known = ", ".join(f"{name} ({'/'.join(f.timm_modules)})"
                      for name, f in Backbone.FAMILIES.items())
    raise ValueError(f"'{arch}' is a timm '{module}' model; supported backbone families: "
                     f"{known}")
