"""Benchmark of the training step: what composing objectives, masking and Lightning cost.

The point of all-in-one pre-training is several objectives for about the price of one, so this
measures, in one run:

1. images/s of a training step for each single objective, ``[mim_feat, clip, cls]`` (input
   shared and native), the M3I experiment and all registered objectives, on the default CPU
   model and on ViT-B/16;
2. the composition ratio: one ``[mim_feat, clip, cls]`` step over the sum of the three single
   steps (each with its reference input, ``input=native``);
3. the overhead ratio: a step inside a real ``Trainer.fit`` (progress bar, logger) over a
   hand-written plain-PyTorch step of the same computation;
4. masked encoding: the encoder's forward+backward at mask ratio 0.75 against 0;
5. peak memory per configuration;
6. multi-crop: the DINO recipe's step time and peak memory with 2+6 crops over 2+0;
7. on CUDA: images/s and MFU of the ViT-B/16 M3I step in bf16, with and without torch.compile.

Every figure is a median over repeated steps after a warm-up step, which also counts the
step's host-device syncs and measures its peak memory. On a shared machine the load changes
while the benchmark runs, so the configurations of one model are stepped in interleaved rounds
and each ratio is the median of its per-round ratios: a burst of load hits numerator and
denominator alike. ViT-B models are too big to hold all at once; they run one after the
other, and their ratios are ratios of medians. On CPU torch runs one intra-op thread unless
``--threads`` says otherwise: on a busy 2-core machine two threads wait on each other and a
step's time becomes a matter of luck (the composed CPU-model step: 3.9 s with two threads
against 0.8 s with one, same load). The CPU run is for ratios; absolute figures are the GPU's.

``--data ...``, ``--eval ...`` and ``--interplay ...`` run another section instead, with the
options that follow: the loader (``scripts/bench_data.py``), the kNN's peak memory
(``scripts/bench_eval.py``) and the interplay monitor's cost (``scripts/bench_interplay.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import (
    PeakMemory,
    SyncCounter,
    count_calls,
    median_ratio,
    synchronize,
    time_rounds,
    timed,
)

import m3i_lightning
from m3i_lightning.components.masking import RandomMask
from m3i_lightning.components.optim import build_optimizer
from m3i_lightning.config.factory import build_datamodule, build_model, build_tokenizer_from
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.objectives import OBJECTIVES

CONF_DIR = Path(m3i_lightning.__file__).resolve().parent / "conf"
COMPOSED = ("mim_feat", "clip", "cls")
TARGETS = {  # name: (comparison, target)
    "composition shared": ("<=", 0.40),
    "composition native": ("<=", 0.70),
    "overhead Lightning/plain": ("<=", 1.05),
    "masked encoding speed-up": (">=", 2.5),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}
# The engine logs without a Trainer when a loop calls training_step itself; that is intended.
warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
warnings.filterwarnings("ignore", message=r".*does not have many workers")


@dataclass
class Spec:
    """One configuration: Hydra overrides on top of conf/config.yaml, and its batch size."""

    model: str
    label: str
    overrides: list[str]
    batch_size: int

    def all_overrides(self, extra: list[str]) -> list[str]:
        return [f"backbone={self.model}", f"data.batch_size={self.batch_size}",
                "data.num_workers=0", *self.overrides, *extra]


@dataclass
class Case:
    """A built configuration, stepped as the Trainer would: training_step, backward, gradient
    clipping when the config asks, AdamW, learning-rate schedule, then the EMA update
    (:meth:`Pretraining.update_teacher`)."""

    spec: Spec
    model: MultiObjective
    batch: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    clip_norm: float | None = None
    steps: int = 0
    autocast: contextlib.AbstractContextManager | None = field(default=None, repr=False)

    def step(self, syncs: SyncCounter | None = None) -> None:
        """One step; ``syncs`` counts the library's host-device syncs (torch's optimizer left
        out: its CPU-resident step counters read as syncs here and are none on CUDA)."""
        ours = syncs or contextlib.nullcontext()
        with self.autocast or contextlib.nullcontext(), ours:
            loss = self.model.training_step(self.batch, self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        with ours:
            loss.backward()
            if self.clip_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]],
                    self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        with ours:
            self.model.update_teacher(self.steps, self.total_steps)
        self.steps += 1


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def build_case(spec: Spec, extra: list[str], device: torch.device,
               total_steps: int = 1000) -> Case:
    """Model, optimizer and one real batch of the embedded data with the fields it needs."""
    torch.manual_seed(0)
    cfg = compose(spec.all_overrides(extra))
    tokenizer = build_tokenizer_from(cfg.text)
    classes = build_datamodule(cfg.data, tokenizer).num_classes
    model = build_model(cfg, classes, tokenizer).to(device)
    data = build_datamodule(cfg.data, tokenizer, fields=model.batch_fields())
    data.setup("fit")
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in next(iter(data.train_dataloader())).items()}
    batch = data.on_after_batch_transfer(batch, 0)  # data.augment_on=device renders here
    # one process stepping this batch: a recipe's base_lr scales with it, as under a Trainer
    optim = build_optimizer(model, model.optim, total_steps, global_batch_size=spec.batch_size)
    model.train()
    return Case(spec, model, batch, optim["optimizer"], optim["lr_scheduler"]["scheduler"],
                total_steps, cfg.trainer.get("gradient_clip_val"))


def specs_for(model: str, batch_size: int, singles: list[str]) -> list[Spec]:
    composed = f"objective=[{','.join(COMPOSED)}]"
    specs = [Spec(model, name, [f"objective=[{name}]", "input=native"], batch_size)
             for name in singles]
    specs += [Spec(model, "[mim_feat,clip,cls] shared", [composed, "input=shared"], batch_size),
              Spec(model, "[mim_feat,clip,cls] native", [composed, "input=native"], batch_size),
              Spec(model, "experiment=m3i", ["experiment=m3i"], batch_size),
              Spec(model, f"all {len(OBJECTIVES)}",
                   [f"objective=[{','.join(OBJECTIVES)}]", "input=shared"], batch_size)]
    return specs


def composition_ratios(times: dict[str, list[float]], model: str, per_round: bool) -> list[dict]:
    """Composed step over the sum of the three single steps, per input mode."""
    rows = []
    singles = [sum(parts) for parts in zip(*(times[n] for n in COMPOSED), strict=True)]
    for mode in ("shared", "native"):
        multi = times[f"[mim_feat,clip,cls] {mode}"]
        value = (median_ratio(multi, singles) if per_round
                 else statistics.median(multi) / statistics.median(singles))
        rows.append(ratio_row(f"composition {mode}", model, value))
    return rows


def ratio_row(name: str, model: str, value: float) -> dict:
    comparison, target = TARGETS[name]
    met = value <= target if comparison == "<=" else value >= target
    return {"name": name, "model": model, "value": value, "target": f"{comparison} {target}",
            "met": met}


def first_step(case: Case, device: torch.device) -> dict:
    """The warm-up step of a configuration, which also counts its encoder passes (student
    and teacher transformer stacks run) and host-device syncs and measures its peak memory
    (the first step creates the optimizer state too)."""
    model, counter = case.model, SyncCounter()
    # a pass runs the network's first block once, whatever the family
    stacks = {"student": model.backbone.blocks()[0]}
    if model.teacher is not None:
        stacks["teacher"] = model.teacher.encoder.blocks()[0]
    with count_calls(stacks) as passes, PeakMemory(device) as memory:
        case.step(counter)
    weights = sum(t.numel() * t.element_size()
                  for t in itertools.chain(model.parameters(), model.buffers()))
    peak = None if memory.rise is None else (weights + memory.rise) / 2**20
    return {"student_passes": passes["student"], "teacher_passes": passes.get("teacher", 0),
            "syncs_per_step": counter.count, "peak_mb": peak}


def throughput_row(spec: Spec, seconds: list[float], first: dict) -> dict:
    ms = 1000 * statistics.median(seconds)
    return {"model": spec.model, "config": spec.label, "batch_size": spec.batch_size,
            "ms_per_step": ms, "images_per_s": spec.batch_size / (ms / 1000),
            "steps_timed": len(seconds), **first}


def bench_interleaved(specs: list[Spec], extra: list[str], device: torch.device,
                      repeats: int) -> tuple[list[dict], list[dict]]:
    """All configurations of a small model held at once and stepped in rounds."""
    cases = {spec.label: build_case(spec, extra, device) for spec in specs}
    firsts = {label: first_step(case, device) for label, case in cases.items()}
    times = time_rounds({label: case.step for label, case in cases.items()}, 0, repeats, device)
    rows = [throughput_row(cases[label].spec, t, firsts[label]) for label, t in times.items()]
    return rows, composition_ratios(times, specs[0].model, per_round=True)


def bench_sequential(specs: list[Spec], extra: list[str], device: torch.device,
                     repeats: int) -> tuple[list[dict], list[dict]]:
    """One configuration at a time (models too big to hold together)."""
    times, rows = {}, []
    for spec in specs:
        case = build_case(spec, extra, device)
        first = first_step(case, device)
        times[spec.label] = time_rounds({spec.label: case.step}, 0, repeats, device)[spec.label]
        rows.append(throughput_row(spec, times[spec.label], first))
        del case
        gc.collect()
    return rows, composition_ratios(times, specs[0].model, per_round=False)


# ---------------------------------------------------------------------------------------------
# Overhead: the composed step through Lightning against the same computation in plain PyTorch.


class PlainStep:
    """``[mim_feat, clip, cls]`` with input=shared written out by hand, independently of the
    engine: the same modules (backbone, EMA teacher, predictor, text tower, heads) called
    directly, the same losses, AdamW with the same hyper-parameters and parameter groups, a
    warmup-cosine learning rate and the EMA update as one foreach lerp. It is what a user
    would write without the library, the yardstick of the engine's and Lightning's overhead.
    """

    def __init__(self, model: MultiObjective, total_steps: int) -> None:
        heads = model.heads
        if set(heads) != set(COMPOSED) or model.input_mode != "shared" or model.mix:
            raise ValueError("the plain step is [mim_feat, clip, cls] with input=shared")
        if (not isinstance(model.mask_generator, RandomMask)
                or heads["mim_feat"].distribution.kind != "mse"):
            raise ValueError("the plain step implements random masks and the MSE loss")
        self.total_steps, self.step_index = total_steps, 0
        self.student, self.teacher = model.backbone, model.teacher.encoder
        self.mim, self.clip, self.cls = heads["mim_feat"], heads["clip"], heads["cls"]
        self.num_visible = model.mask_generator.num_visible
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                plain = p.ndim <= 1 or name.rsplit(".", 1)[-1] in (
                    "pos_embed", "cls_token", "mask_token", "logit_scale")
                (no_decay if plain else decay).append(p)
        optim = model.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr, betas=tuple(optim.betas))
        warmup = int(optim.warmup_fraction * total_steps)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            cosine = math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1))
            return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * (1 + cosine) / 2

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.teacher_params = list(self.teacher.parameters())
        self.student_params = list(self.student.parameters())
        self.momentum = model.teacher.momentum

    def __call__(self, batch: dict) -> None:
        images = batch["view1"]
        with torch.no_grad():
            target_tokens = self.teacher(images).tokens
        order = torch.rand(images.shape[0], self.student.num_patches,
                           device=images.device).argsort(dim=1)
        visible = order[:, : self.num_visible].sort(dim=1).values
        hidden = order[:, self.num_visible:].sort(dim=1).values
        encoded = self.student(images, visible, hidden)

        predictor = self.mim.predictor
        pred = predictor(encoded.tokens, visible, predictor.pos_embed[hidden])
        target = target_tokens.gather(1, hidden[..., None].expand(-1, -1, target_tokens.shape[-1]))
        mim = F.mse_loss(pred, F.layer_norm(target, target.shape[-1:]))

        image = F.normalize(self.clip.image_proj(encoded.global_feature), dim=-1)
        text = F.normalize(self.clip.text_tower(batch["text"], batch["text_mask"]), dim=-1)
        scale = self.clip.logit_scale.exp().clamp(max=self.clip.max_logit_scale).squeeze()
        labels = torch.arange(images.shape[0], device=images.device)
        clip = (F.cross_entropy(scale * image @ text.T, labels)
                + F.cross_entropy(scale * text @ image.T, labels)) / 2

        logits = self.cls.class_embed(encoded.global_feature)
        cls = F.cross_entropy(logits, batch["label"])

        loss = self.mim.weight * mim + self.clip.weight * clip + self.cls.weight * cls
        with torch.no_grad():  # what a loop keeps to print, as the engine logs its terms
            self.logs = {"loss": loss.detach(), "mim_feat": mim.detach(),
                         "clip": clip.detach(), "cls": cls.detach(), "logit_scale": scale,
                         "acc": (logits.argmax(-1) == batch["label"]).float().mean()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        progress = min(self.step_index / self.total_steps, 1.0)
        momentum = 1 - (1 - self.momentum) * (math.cos(math.pi * progress) + 1) / 2
        with torch.no_grad():
            torch._foreach_lerp_(self.teacher_params, self.student_params, 1 - momentum)
        self.step_index += 1


class SameBatch(torch.utils.data.Dataset):
    """``length`` times one prepared batch: data loading costs nothing on either side."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def paired_timer(plain: PlainStep, batch: dict, device: torch.device):
    """A Callback that times Lightning's steps and runs one plain step after each of them.

    Lightning's step is the gap between consecutive batch starts (fetch, hooks, the step,
    logging, progress bar) less the plain step run inside it, at the batch end and timed on
    its own. The two kinds of step alternate one by one, so the load of a shared machine hits
    both alike; the pairs give the ratio.
    """
    import lightning as L

    class PairedTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.plain: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            synchronize(device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, *args) -> None:
            with torch.enable_grad():
                self.plain.append(timed(lambda: plain(batch), device))

        def on_train_end(self, *args) -> None:
            synchronize(device)
            self.starts.append(time.perf_counter())

        def pairs(self) -> list[tuple[float, float]]:
            gaps = [b - a for a, b in itertools.pairwise(self.starts)]
            return [(gap - p, p) for gap, p in zip(gaps, self.plain, strict=True)]

    return PairedTimer()


@contextlib.contextmanager
def quiet_lightning():
    """The progress bar's text is captured and Lightning's start-up notes are held back, so
    the benchmark prints its table only; they are still produced, as in a user's run."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def bench_overhead(model_name: str, batch_size: int, extra: list[str], device: torch.device,
                   warmup: int, repeats: int) -> dict:
    """``Trainer.fit`` as users run it (progress bar, CSV logger, the CLI's learning-rate
    monitor) against :class:`PlainStep` on one model, the steps paired one by one."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    spec = Spec(model_name, "[mim_feat,clip,cls] shared",
                [f"objective=[{','.join(COMPOSED)}]", "input=shared"], batch_size)
    case = build_case(spec, extra, device)
    steps = warmup + repeats
    timer = paired_timer(PlainStep(case.model, total_steps=steps), case.batch, device)
    loader = torch.utils.data.DataLoader(SameBatch(case.batch, steps), batch_size=None)
    log_every = compose(spec.all_overrides(extra)).trainer.log_every_n_steps
    with tempfile.TemporaryDirectory() as logdir, quiet_lightning():
        trainer = L.Trainer(max_steps=steps, accelerator=device.type, devices=1,
                            precision="32-true", logger=CSVLogger(logdir),
                            enable_checkpointing=False, log_every_n_steps=log_every,
                            limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[timer, LearningRateMonitor("step")])
        trainer.fit(case.model, train_dataloaders=loader)
    pairs = timer.pairs()[warmup:]
    lightning_ms = 1000 * statistics.median(a for a, _ in pairs)
    plain_ms = 1000 * statistics.median(b for _, b in pairs)
    row = ratio_row("overhead Lightning/plain", model_name,
                    statistics.median(a / b for a, b in pairs))
    row["detail"] = f"{lightning_ms:.1f} ms Lightning vs {plain_ms:.1f} ms plain"
    return row


# ---------------------------------------------------------------------------------------------
# Multi-crop: what DINO's local crops cost.

LOCAL_CROPS = (0, 6)  # 2+0 against 2+6 crops (DINO's own comparison, its Table 9)


def bench_multicrop(model_name: str, batch_size: int, extra: list[str], device: torch.device,
                    repeats: int) -> dict:
    """The DINO recipe's step with 2 global crops and no local one against 2 global and 6
    local crops (``data.local_crops.count``), stepped in rounds: the ratios of step time and
    of peak memory, both from this one run."""
    labels = [f"2+{count}" for count in LOCAL_CROPS]
    cases = {label: build_case(Spec(model_name, f"experiment=dino {label}",
                                    ["experiment=dino", f"data.local_crops.count={count}"],
                                    batch_size), extra, device)
             for label, count in zip(labels, LOCAL_CROPS, strict=True)}
    firsts = {label: first_step(case, device) for label, case in cases.items()}
    times = time_rounds({label: case.step for label, case in cases.items()}, 0, repeats, device)
    base, multi = labels
    peaks = [firsts[label]["peak_mb"] for label in labels]
    return {"name": f"multi-crop {multi} / {base}", "model": model_name,
            "batch_size": batch_size,
            "step_time": median_ratio(times[multi], times[base]),
            "peak_memory": None if None in peaks else peaks[1] / peaks[0],
            "student_passes": {label: firsts[label]["student_passes"] for label in labels}}


# ---------------------------------------------------------------------------------------------
# Masked encoding.


def bench_masking(model_name: str, batch_size: int, extra: list[str], device: torch.device,
                  warmup: int, repeats: int) -> dict:
    """Student encoder forward+backward on the full view against visible tokens only."""
    from m3i_lightning.components.masking import build_mask
    from m3i_lightning.config.factory import build_backbone

    cfg = compose(Spec(model_name, "", [], batch_size).all_overrides(extra))
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone).to(device).train()
    images = torch.randn(batch_size, 3, cfg.backbone.img_size, cfg.backbone.img_size,
                         device=device)
    masks = build_mask("random", backbone.grid_size, 0.75)

    def run(masked: bool) -> Callable[[], None]:
        def step() -> None:
            index = masks.split(masks(batch_size, device)) if masked else ()
            encoded = backbone(images, *index)
            (encoded.tokens.mean() + encoded.global_feature.mean()).backward()
            backbone.zero_grad(set_to_none=True)
        return step

    times = time_rounds({"full": run(False), "masked": run(True)}, warmup, repeats, device)
    row = ratio_row("masked encoding speed-up", model_name,
                    median_ratio(times["full"], times["masked"]))
    row["detail"] = (f"{1000 * statistics.median(times['full']):.1f} ms at ratio 0 vs "
                     f"{1000 * statistics.median(times['masked']):.1f} ms at 0.75")
    return row


# ---------------------------------------------------------------------------------------------
# CUDA: bf16 throughput and model-FLOPs utilisation of the ViT-B/16 M3I step.


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The device's dense bf16 peak: ``given``, else the built-in table's (None off CUDA)."""
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_flops(case: Case) -> int:
    """FLOPs of one step as torch's FlopCounterMode counts them (matmuls, convolutions and
    attention of the student forward+backward, the teacher, the heads, the text tower)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        case.step()
    return counter.get_total_flops()


def bf16_rows(spec: Spec, extra: list[str], device: torch.device, warmup: int, repeats: int,
              given_peak: float | None, compiled: tuple[bool, ...] = (False, True)) -> list[dict]:
    """The configuration's step under bf16 autocast, eager and then (``compiled``) with its
    transformer blocks compiled (the library's ``compile`` option): images/s, FLOPs, MFU and
    the peak memory of the timed steps. FLOPs are counted once, eagerly: compiling changes no
    arithmetic."""
    from m3i_lightning.engine.sharding import compile_blocks

    peak = peak_tflops(device, given_peak)
    case = build_case(spec, extra, device)
    case.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    flops = step_flops(case)
    rows = []
    for compile_now in compiled:
        if compile_now:
            compile_blocks(case.model)
        time_rounds({spec.label: case.step}, warmup, 0, device)  # compiling: not timed
        with PeakMemory(device) as memory:
            seconds = time_rounds({spec.label: case.step}, 0, repeats, device)[spec.label]
        step_s = statistics.median(seconds)
        achieved = flops / step_s / 1e12
        rows.append({"config": f"{spec.model} {spec.label} bf16", "compiled": compile_now,
                     "batch_size": spec.batch_size, "ms_per_step": 1000 * step_s,
                     "images_per_s": spec.batch_size / step_s, "tflops_per_step": flops / 1e12,
                     "achieved_tflops": achieved, "peak_tflops": peak,
                     "mfu": achieved / peak if peak else None,
                     "peak_mb": None if memory.rise is None
                     else (memory.base + memory.rise) / 2**20})
    return rows


def bench_gpu(batch_size: int, extra: list[str], device: torch.device, warmup: int,
              repeats: int, given_peak: float | None) -> list[dict]:
    """The ViT-B/16 M3I step in bf16, eager and compiled."""
    return bf16_rows(Spec("vit_base", "experiment=m3i", ["experiment=m3i"], batch_size),
                     extra, device, warmup, repeats, given_peak)


# ---------------------------------------------------------------------------------------------
# Report.


def progress(message: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def format_tables(result: dict) -> str:
    lines = [f"device: {result['device']}, torch threads: {result['threads']}",
             "", f"{'model':<9} {'configuration':<28} {'batch':>5} {'ms/step':>9} "
             f"{'images/s':>9} {'passes':>6} {'syncs':>5} {'peak MB':>8}"]
    for row in result["throughput"]:
        mb, passes = row["peak_mb"], f"{row['student_passes']}+{row['teacher_passes']}"
        lines.append(f"{row['model']:<9} {row['config']:<28} {row['batch_size']:>5} "
                     f"{row['ms_per_step']:>9.1f} {row['images_per_s']:>9.1f} {passes:>6} "
                     f"{row['syncs_per_step']:>5} {'-' if mb is None else f'{mb:.0f}':>8}")
    lines.append("passes: student + teacher encoder passes per step; syncs: host-device syncs "
                 "per step (SyncCounter; the NaN check is one)")
    lines.append(f"peak MB: {result['memory_method']}")
    lines += ["", f"{'ratio':<26} {'model':<9} {'value':>6} {'target':>8}  met   detail"]
    for row in result["ratios"]:
        lines.append(f"{row['name']:<26} {row['model']:<9} {row['value']:>6.2f} "
                     f"{row['target']:>8}  {'yes' if row['met'] else 'NO ':<5} "
                     f"{row.get('detail', '')}")
    lines += ["", f"{'multi-crop (DINO recipe)':<26} {'model':<9} {'batch':>5} "
              f"{'step time':>9} {'peak mem':>8}  student passes"]
    for row in result["multicrop"]:
        memory = "-" if row["peak_memory"] is None else f"{row['peak_memory']:.2f}x"
        passes = ", ".join(f"{k}: {v}" for k, v in row["student_passes"].items())
        lines.append(f"{row['name']:<26} {row['model']:<9} {row['batch_size']:>5} "
                     f"{row['step_time']:>8.2f}x {memory:>8}  {passes}")
    gpu = result["gpu"]
    lines.append("")
    if isinstance(gpu, str):
        lines.append(f"GPU: {gpu}")
    else:
        for row in gpu:
            mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            lines.append(f"GPU {row['config']} compiled={row['compiled']}: "
                         f"{row['images_per_s']:.1f} images/s, {row['achieved_tflops']:.1f} "
                         f"TFLOP/s, MFU {mfu}")
    return "\n".join(lines)


# options that hand the rest of the command line to another script of this folder
SECTIONS = {"data": "bench_data", "eval": "bench_eval", "interplay": "bench_interplay"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, the CPU model only: a smoke run")
    parser.add_argument("--data", nargs=argparse.REMAINDER, metavar="OPTION",
                        help="the loader benchmark instead (scripts/bench_data.py: the 224 px "
                             "pipeline against torchvision's, then the loader against the "
                             "step), given the options that follow: --path, --images, "
                             "--rounds, --gpu-rate, --workers, --batches, --json")
    parser.add_argument("--eval", nargs=argparse.REMAINDER, metavar="OPTION",
                        help="the kNN memory benchmark instead (scripts/bench_eval.py), given "
                             "the options that follow: --bank, --dim, --queries, "
                             "--chunk-sizes, --device, --json")
    parser.add_argument("--interplay", nargs=argparse.REMAINDER, metavar="OPTION",
                        help="the interplay monitor's cost instead (scripts/bench_interplay.py: "
                             "a measurement against a training step), given the options that "
                             "follow: --every, --repeats, --batch-size, --set, --json")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default on CPU: 1, see the module doc)")
    parser.add_argument("--models", nargs="+", help="backbone configs (default: vit_cpu "
                        "vit_base convnext_cpu; --quick: vit_cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the CPU model")
    parser.add_argument("--vit-b-batch-size", type=int,
                        help="batch of ViT-B (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--gpu-batch-size", type=int, default=128,
                        help="batch of the bf16 ViT-B M3I step on CUDA")
    parser.add_argument("--objectives", nargs="+",
                        help="single objectives to time (default: all registered; "
                        "mim_feat, clip and cls are always timed, for the composition ratio)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides applied to every configuration")
    parser.add_argument("--repeats", type=int, help="timed steps per configuration")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense bf16 peak, when not in the built-in table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for option, script in SECTIONS.items():
        section_args = getattr(args, option)
        if section_args is not None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            importlib.import_module(script).main(section_args)
            return {}
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    models = args.models or (["vit_cpu"] if args.quick else ["vit_cpu", "vit_base",
                                                             "convnext_cpu"])
    repeats = args.repeats or (2 if args.quick else 5)
    big_repeats = args.repeats or (1 if args.quick else 2)
    singles = list(dict.fromkeys([*COMPOSED, *(args.objectives or OBJECTIVES)]))
    extra = args.set
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"CPU ({platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores)",
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "command": " ".join(["scripts/benchmark.py", *(argv or sys.argv[1:])]),
                    "throughput": [], "ratios": [], "multicrop": []}

    def batch_size(model: str) -> int:
        if model.endswith("_cpu"):
            return args.batch_size
        return args.vit_b_batch_size or (32 if device.type == "cuda" else 2)

    # one unmeasured step first: the libraries' one-time allocations are nobody's peak memory
    build_case(specs_for(models[0], 2, singles)[0], extra, device).step()
    for model in models:
        small, vit = model.endswith("_cpu"), model.startswith("vit")
        batch = batch_size(model)
        # another family: the composition ratio's three objectives only (its other rows are
        # the ViT's story); masked encoding is dense there (mask tokens), nothing to speed up
        specs = specs_for(model, batch, singles if vit else list(COMPOSED))
        progress(f"{model}: {len(specs)} configurations, batch {batch}")
        bench = bench_interleaved if small else bench_sequential
        rows, ratios = bench(specs, extra, device, repeats if small else big_repeats)
        result["throughput"] += rows
        result["ratios"] += ratios
        if not vit:
            continue
        progress(f"{model}: masked encoding")
        result["ratios"].append(bench_masking(model, batch, extra, device, 1,
                                              max(repeats, 3) if small else big_repeats + 1))
    vits = [m for m in models if m.startswith("vit")]  # the plain step is written for a ViT
    if vits:
        progress(f"{vits[0]}: Trainer.fit against the plain step")
        result["ratios"].append(bench_overhead(vits[0], batch_size(vits[0]), extra, device,
                                               warmup=2, repeats=2 * repeats))
        progress(f"{vits[0]}: multi-crop 2+0 against 2+6")
        result["multicrop"].append(bench_multicrop(vits[0], batch_size(vits[0]), extra, device,
                                                   max(repeats, 3)))
    result["memory_method"] = PeakMemory.METHOD[device.type]
    if device.type == "cuda":
        progress("vit_base: bf16 M3I step, eager and compiled")
        result["gpu"] = bench_gpu(args.gpu_batch_size, extra, device, 3, 10, args.peak_tflops)
    else:
        result["gpu"] = "skipped: no CUDA device"
    print(format_tables(result))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {args.out}")
    return result


if __name__ == "__main__":
    main()
