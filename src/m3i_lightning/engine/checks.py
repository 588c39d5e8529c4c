"""What the engine refuses before anything is built on a bad combination, as pure functions of
the backbone, the heads, the teacher and the plan.

Every message names the options as a Python caller writes them: the engine's own parameters
bare (``mask_ratio=1.0``), another object's as its constructor call
(``MaskedFeature(target_blocks=3)``, ``Backbone(mask_token=True)``). The config layer re-words
them into its key paths (:func:`m3i_lightning.config.factory.config_spelling`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.masking import MASKS, MaskGenerator
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.mixing import check_mixable
from m3i_lightning.engine.plan import INPUT_MODES, Plan
from m3i_lightning.engine.teacher import TargetEncoder
from m3i_lightning.objectives import OBJECTIVES
from m3i_lightning.objectives.base import Objective


def calls(objectives: Mapping[str, Objective], **options) -> str:
    """``Cls(option=value, ...)`` of each objective: how a caller builds it with ``options``."""
    given = ", ".join(f"{option}={value!r}" for option, value in options.items())
    return ", ".join(f"{type(o).__name__}({given})" for o in objectives.values())


def check_input(input_mode: str, mix: bool) -> None:
    if input_mode not in INPUT_MODES:
        raise ConfigError(f"input_mode={input_mode!r} must be one of {list(INPUT_MODES)}")
    if mix and input_mode != "shared":
        raise ConfigError("mix=True mixes two images into the one shared input: it needs "
                          "input_mode='shared'")


def check_mask(kind: str, ratio: float) -> None:
    if kind not in MASKS:
        raise ConfigError(f"mask={kind!r} must be one of {sorted(MASKS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"mask_ratio={ratio!r} must be a number in [0, 1)")


def check_mask_grid(generator: MaskGenerator, ratio: float, objectives: Mapping[str, Objective],
                    mixed: bool) -> None:
    """A ratio that hides no patch (or every patch) of the grid is refused here rather than
    as a NaN loss later; a mix needs both images' visible patches in one grid."""
    if generator.num_masked == 0 or generator.num_visible == 0:
        masked = sorted(n for n, o in objectives.items() if o.masked_input) or ["mix"]
        raise ConfigError(f"mask_ratio={ratio} hides {generator.num_masked} of "
                          f"{generator.num_patches} patches, but {masked} need masked and "
                          "visible patches: choose a ratio in (0, 1), e.g. 0.75")
    if mixed:
        try:
            check_mixable(generator)
        except ValueError as err:
            raise ConfigError(f"mask_ratio={ratio} with mix=True: {err}") from None


def check_backbone(backbone: Backbone, objectives: Mapping[str, Objective], mix: bool) -> None:
    """A family without masked input or dense tokens (ResNet) serves the global objectives
    only: name the others, and the mix, before anything is built on it."""

    def unserved(objective: Objective | type[Objective]) -> bool:
        return ((objective.masked_input and not backbone.supports_masking)
                or (objective.reads_tokens() and not backbone.supports_dense))

    needs = sorted(n for n, o in objectives.items() if unserved(o))
    needs += ["mix"] if mix and not backbone.supports_masking else []
    if needs:
        lacks = [what for what, has in (("masked input", backbone.supports_masking),
                                        ("dense tokens", backbone.supports_dense)) if not has]
        usable = sorted(n for n, o in OBJECTIVES.items() if not unserved(o))
        raise ConfigError(
            f"backbone '{backbone.arch}' ({backbone.family} family) gives no "
            f"{' and no '.join(lacks)}, which {needs} need: select only objectives among "
            f"{usable} (and mix=False), or a vit, swin or convnext backbone")


def check_masked_tokens(backbone: Backbone, objectives: Mapping[str, Objective],
                        mix: bool) -> None:
    """An objective reading the encoder's outputs at the masked cells (data2vec's linear
    head) needs them encoded, as a mask token, and encoded for its own image: a mix puts the
    partner image's patches in those cells."""
    reading = {n: o for n, o in objectives.items() if o.reads_masked_tokens}
    if not reading:
        return
    linear, transformer = (calls(reading, predictor=p) for p in ("linear", "transformer"))
    if not backbone.masks_by_token:
        raise ConfigError(
            f"{linear} reads the encoder's outputs at the masked cells, but backbone "
            f"'{backbone.arch}' ({backbone.family} family) drops the masked patches: build it "
            f"with Backbone(mask_token=True) (a ViT encoding them as a mask token), or use "
            f"{transformer}")
    if mix:
        raise ConfigError(
            f"{linear} reads the encoder's outputs at each image's masked cells, where "
            f"mix=True encodes the partner image's patches: use mix=False or {transformer}")


def check_batch_augment(objectives: Mapping[str, Objective]) -> None:
    """A batch augmentation (cls's Mixup / CutMix) mixes the images of the batch before they
    are encoded, once for all objectives: with others beside it they would read mixed images
    (and targets of mixed views), so it runs only alone."""
    augmenting = {n: o for n, o in objectives.items() if o.augments_batch}
    if augmenting and len(objectives) > 1:
        raise ConfigError(
            f"objective(s) {sorted(augmenting)} mix the images of each batch (mixup / cutmix), "
            f"which the other objectives {sorted(set(objectives) - set(augmenting))} would "
            f"read too: train it alone, or with {calls(augmenting, mixup=0.0, cutmix=0.0)}")


def check_teacher_width(teacher: TargetEncoder, objectives: Mapping[str, Objective]) -> None:
    """A teacher of another width fits only heads sized for it (``target_dim``)."""
    width = teacher.embed_dim
    wrong = {n: o for n, o in objectives.items() if o.uses_teacher and o.target_width != width}
    if wrong:
        raise ConfigError(
            f"the teacher's features are {width} wide but objective(s) {sorted(wrong)} read "
            f"{sorted({o.target_width for o in wrong.values()})}-wide targets: build them with "
            f"{calls(wrong, target_dim=width)} where they take one, or use a teacher as "
            "wide as the student")


def check_teacher_blocks(teacher: TargetEncoder | None,
                         objectives: Mapping[str, Objective]) -> None:
    """Objectives reading the teacher's last block outputs (``teacher_blocks``, set by their
    ``target_blocks``) need a teacher that gives them, as many as each reads."""
    wanting = {n: o for n, o in objectives.items() if o.teacher_blocks}
    if not wanting:
        return
    asked = ", ".join(f"{type(o).__name__}(target_blocks={o.teacher_blocks})"
                      for o in wanting.values())
    if getattr(teacher, "project", False):
        raise ConfigError(f"{asked} reads the teacher's last block outputs, which its "
                          "projection (FrozenTeacher(project=True)) does not map: use "
                          f"{calls(wanting, target_blocks=0)} or "
                          "FrozenTeacher(project=False)")
    encoder = teacher.encoder
    if not encoder.supports_top_blocks:
        raise ConfigError(f"{asked} reads the teacher's last block outputs, which a "
                          f"{encoder.family} teacher does not give: use a vit teacher or "
                          f"{calls(wanting, target_blocks=0)}")
    depth = len(encoder.blocks())
    if max(o.teacher_blocks for o in wanting.values()) > depth:
        raise ConfigError(f"{asked} averages that many of the teacher's last blocks, but "
                          f"'{encoder.arch}' has {depth}: choose at most {depth}")


def check_guided_mask(plan: Plan, teacher: TargetEncoder, backbone: Backbone) -> None:
    """An attention-guided mask (``mask='attention'``) follows the teacher's class-token
    attention of the very images it masks, on the student's patch grid: any ViT teacher with
    a class token (EMA or frozen) whose pass covers every masked view."""
    if plan.mixed:
        raise ConfigError("mask='attention' draws each image's mask from its own teacher "
                          "attention; M3I's mix (mix=True) draws the two images' masks "
                          "together: use mask='random' or mask='block' with the mix")
    masked_views = sorted({i.view for i in plan.inputs if i.masked})
    unseen = [view for view in masked_views if view not in plan.teacher_views]
    if unseen:
        raise ConfigError(f"mask='attention' follows the teacher's attention of each masked "
                          f"view, but the teacher encodes only {list(plan.teacher_views)} and "
                          f"the student masks {unseen}: select an objective whose target is "
                          "the teacher's encoding of the masked view (mim_feat), or "
                          "mask='random'")
    encoder = teacher.encoder
    if not encoder.supports_class_attention:
        raise ConfigError(f"mask='attention' follows the teacher's class-token attention; "
                          f"the teacher '{encoder.arch}' ({encoder.family} family) has no class "
                          "token: use a ViT teacher with one, or mask='random'")
    if tuple(encoder.grid_size) != tuple(backbone.grid_size):
        raise ConfigError(f"mask='attention' maps the teacher's patches onto the student's, "
                          f"but the teacher's grid is {encoder.grid_size} and the student's "
                          f"{backbone.grid_size}: give the teacher the student's patch grid")


def check_data(objectives: Mapping[str, Objective], provides: Iterable[str]) -> None:
    """Fail before training when an objective needs something the data lacks."""
    provides = set(provides)
    for name, objective in objectives.items():
        missing = objective.requires - provides
        if missing:
            raise ConfigError(f"objective '{name}' needs {sorted(missing)} but the data "
                              f"provides only {sorted(provides)}")


def check_batch_size(objectives: Mapping[str, Objective], batch_size: int) -> None:
    """Contrastive losses and BatchNorm heads mean nothing on one sample per process."""
    for name, objective in objectives.items():
        if batch_size < objective.min_batch_size:
            raise ConfigError(f"objective '{name}' needs a per-process batch of at least "
                              f"{objective.min_batch_size} (negatives / BatchNorm across the "
                              f"batch), got batch_size={batch_size}")
