"""The accelerator check: one command, one JSON file (``scripts/gpu_check.sh`` runs it).

    python scripts/gpu_check.py [--out gpu_check.json] [--tiny] [--budget-s 420]

On CUDA, ViT-B/16 at 224 px, batch ``--batch-size`` per GPU, bf16 autocast:

- images/s, MFU and peak memory of the M3I step (``experiment=m3i``) and of
  ``[mim_feat, clip, cls]``, eager and with the transformer blocks compiled
  (``scripts/benchmark.py``'s :func:`bf16_rows`);
- the same under FSDP1 and FSDP2 on one GPU, through a real ``Trainer.fit`` of the library's
  strategies (``strategy=fsdp1`` / ``fsdp``; FSDP1 refuses M3I's averaged decoder projection,
  so its row is ``[mim_feat, clip, cls]``); images/s of the step alone (a callback times
  batch start to batch end), peak memory from ``torch.cuda.max_memory_allocated``;
- for each ``data.augment_on``, the image-folder loader's images/s (synthetic 320×240 JPEGs,
  ``--workers`` workers, BYOL's colour augmentations) against the eager M3I step's
  (``scripts/bench_data.py``'s :func:`loader_rows`; the device path includes its rendering).

MFU = achieved FLOP/s / peak, the FLOPs of a step counted by ``torch.utils.flop_counter``
(``FlopCounterMode``) and the peak the device's dense bf16 figure (H100 / H200: 989 TFLOP/s;
``--peak-tflops`` for another). Without CUDA (``--tiny``: a 16 px ViT) the eager and loader
rows are measured on CPU and every CUDA-only row reads ``skipped: needs CUDA``; a row that
fails reads ``failed: <error>``, one past ``--budget-s`` ``skipped: time budget``, and the file
is rewritten after each section, so it always holds every row (``not reached: ...`` where the
check was stopped from outside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402  (the scripts folder, as scripts/benchmark.py --data imports it)
import benchmark  # noqa: E402
from measure import synchronize  # noqa: E402

from m3i_lightning.config.factory import build_datamodule, build_model, build_tokenizer_from  # noqa: E402
from m3i_lightning.config.trainer import build_trainer  # noqa: E402
from m3i_lightning.runtime.strategies import build_strategy  # noqa: E402

NEEDS_CUDA = "skipped: needs CUDA"
NOT_REACHED = "not reached: the check was stopped before this row"
CONFIGS = {"m3i": ["experiment=m3i"],
           "[mim_feat,clip,cls]": ["objective=[mim_feat,clip,cls]", "input=shared"]}
SHARDED = {"fsdp1 [mim_feat,clip,cls]": ("fsdp1", "[mim_feat,clip,cls]"),
           "fsdp2 [mim_feat,clip,cls]": ("fsdp", "[mim_feat,clip,cls]"),
           "fsdp2 m3i": ("fsdp", "m3i")}
TINY = ["backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=2",
        "backbone.num_heads=2", "data.source_size=16"]


def row_names() -> list[str]:
    """Every row of the JSON, in order."""
    steps = [f"{name} bf16 {mode}" for name in CONFIGS for mode in ("eager", "compiled")]
    return [*steps, *(f"{name} bf16" for name in SHARDED),
            *(f"loader {on} / step" for on in ("workers", "device"))]


class StepTimer(L.Callback):
    """Seconds of each training step after ``warmup`` steps, batch start to batch end (the
    loader's wait between steps left out), the device's queued work included."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self.start, self.steps = warmup, [], 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        synchronize(module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize(module.device)
        self.steps += 1
        if self.steps > self.warmup:
            self.seconds.append(time.perf_counter() - self.start)


def sharded_row(strategy: str, config: str, args, flops: int | None) -> dict:
    """A few steps of ``Trainer.fit`` under ``strategy`` on one GPU, in bf16."""
    steps = args.warmup + args.repeats
    cfg = benchmark.compose([
        "backbone=vit_base", *CONFIGS[config], f"strategy={strategy}",
        f"data.batch_size={args.batch_size}", "data.source_size=224",
        f"data.num_workers={args.workers}", "data.augment_on=device", "trainer.devices=1",
        "trainer.precision=bf16-mixed", f"trainer.max_steps={steps}",
        "+trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "export=false"])
    tokenizer = build_tokenizer_from(cfg.text)
    data = build_datamodule(cfg.data, tokenizer)
    model = build_model(cfg, data.num_classes, tokenizer)
    timer = StepTimer(args.warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, strategy=build_strategy(cfg.strategy, model), logger=False,
                                callbacks=[timer], enable_checkpointing=False,
                                default_root_dir=out)
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, datamodule=data)
    step_s = statistics.median(timer.seconds)
    peak = benchmark.peak_tflops(torch.device("cuda"), args.peak_tflops)
    achieved = flops / step_s / 1e12 if flops else None
    return {"config": f"vit_base {config} {strategy} bf16", "batch_size": args.batch_size,
            "ms_per_step": 1000 * step_s, "images_per_s": args.batch_size / step_s,
            "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if achieved and peak else None,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def loader_rows(args, device: torch.device, model: list[str], step_images_per_s: float):
    """Both ``augment_on`` paths' loaders against the step's images/s."""
    overrides = [*model, *CONFIGS["m3i"], f"data.batch_size={args.batch_size}",
                 "data.augment=byol"]
    model, cfg, tokenizer = bench_data.default_model(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench_data.write_jpegs(Path(tmp), args.loader_batches * args.batch_size)
        rows, feeds = bench_data.loader_rows(folder, cfg, tokenizer, model.batch_fields(),
                                             args.workers, device)
    return {f"loader {on} / step": {
        "loader_images_per_s": feed, "step_images_per_s": step_images_per_s,
        "ratio": feed / step_images_per_s,
        "details": {row["name"]: row["value"] for row in rows
                    if row["name"].startswith(f"{on}:") or on in row["name"].split()}}
        for on, feed in feeds.items()}


def check(args, write) -> dict:
    """Every section in turn; ``write`` gets the whole result after each, rows not reached yet
    marked so, so a run stopped from outside (the 8-minute limit) still leaves every row."""
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # as scripts/benchmark.py on CPU: see its module doc
    backbone, extra = ("vit_base", []) if cuda else ("vit_cpu", TINY)
    started = time.perf_counter()
    rows: dict[str, object] = {}

    def result() -> dict:
        return {"device": torch.cuda.get_device_name(device) if cuda else "CPU",
                "model": "ViT-B/16 224 px" if cuda else "vit_cpu at 16 px (--tiny / no CUDA)",
                "batch_size": args.batch_size, "torch": torch.__version__,
                "peak": "dense bf16 TFLOP/s: --peak-tflops, else H100/H200 989 (A100 312)",
                "flops": "torch.utils.flop_counter.FlopCounterMode, one eager step",
                "seconds": time.perf_counter() - started,
                "rows": {name: rows.get(name, NOT_REACHED) for name in row_names()}}

    def measure(names: list[str], fn, needs_cuda: bool = False) -> None:
        if needs_cuda and not cuda:
            rows.update(dict.fromkeys(names, NEEDS_CUDA))
        elif time.perf_counter() - started > args.budget_s:
            rows.update(dict.fromkeys(names, "skipped: time budget"))
        else:
            try:
                rows.update(fn())
            except Exception as err:  # a row that fails must not lose the others
                line = str(err).strip().splitlines()[0] if str(err).strip() else ""
                rows.update(dict.fromkeys(names, f"failed: {type(err).__name__}: {line}"))
            benchmark.progress(f"gpu check: {', '.join(names)} done")
        write(result())

    flops: dict[str, int] = {}
    modes = ("eager", "compiled") if cuda else ("eager",)
    for name, overrides in CONFIGS.items():
        spec = benchmark.Spec(backbone, name, overrides, args.batch_size)

        def steps(spec=spec, name=name) -> dict:
            found = benchmark.bf16_rows(spec, extra, device, args.warmup, args.repeats,
                                        args.peak_tflops, tuple(m == "compiled" for m in modes))
            flops[name] = round(found[0]["tflops_per_step"] * 1e12)
            return {f"{name} bf16 {mode}": row for mode, row in zip(modes, found, strict=True)}

        measure([f"{name} bf16 {mode}" for mode in modes], steps)
        rows.setdefault(f"{name} bf16 compiled", NEEDS_CUDA)
    for name, (strategy, config) in SHARDED.items():
        measure([f"{name} bf16"], lambda n=name, s=strategy, c=config: {
            f"{n} bf16": sharded_row(s, c, args, flops.get(c))}, needs_cuda=True)
    step = rows.get("m3i bf16 eager")
    if isinstance(step, dict):
        measure(["loader workers / step", "loader device / step"],
                lambda: loader_rows(args, device, [f"backbone={backbone}", *extra],
                                    step["images_per_s"]))
    else:
        rows.update(dict.fromkeys(["loader workers / step", "loader device / step"],
                                  "skipped: no step measured"))
    final = result()
    write(final)
    return final


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--tiny", action="store_true", help="the CPU model even on CUDA")
    parser.add_argument("--batch-size", type=int, help="per GPU (default 128; --tiny: 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8, help="loader workers")
    parser.add_argument("--loader-batches", type=int, default=4,
                        help="batches of synthetic JPEGs the loaders read")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--budget-s", type=float, default=420,
                        help="no new section starts after this many seconds")
    args = parser.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    args.batch_size = args.batch_size or (4 if tiny else 128)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = check(args, lambda partial: args.out.write_text(json.dumps(partial, indent=2)))
    print(json.dumps(result["rows"], indent=1))
    print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
