"""Data-loading benchmark: is the loader fast enough to feed the training step?

    python scripts/bench_data.py [--path DIR] [--workers 2] [--batches 4] [--json FILE]

Measures, on the default CPU model (``backbone=vit_cpu``, ``[mim_feat, clip, cls]``, the
default batch size), for each ``data.augment_on`` path (``workers``: the worker decodes and
builds both views; ``device``: it decodes and ships the uint8 image and the views' parameters,
which the step renders, :mod:`m3i_lightning.data.device_views`):

1. loader images/s of one worker, through the real ``data=imagefolder`` path, on one thread;
2. loader images/s with ``--workers`` workers, over a whole epoch including their start-up;
3. for ``device``: images/s of rendering the views of a batch on this machine's device;
4. training images/s: forward, backward, optimizer step and EMA update of the same model on
   a batch from that loader;
5. the ratios: one worker of ``device`` over one of ``workers`` (measured in this one run),
   and per path the loader over the step (for ``device`` the step plus its rendering): the
   loader is not the bottleneck when the second is ≥ 1.

Without ``--path`` it writes enough JPEGs of 320×240 (ImageNet's typical size and cost) with
smooth random content to a temporary folder (``--batches`` batches). Loader and step are
timed one after the other (the step: median after a warm-up), so on a shared machine both see
similar load; while training, the workers compete with the step for the same cores.
``main`` is a section of ``scripts/benchmark.py --data``; ``bench_data`` returns rows, and
``loader_rows`` the loader's part for another step (``scripts/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from measure import time_rounds
from PIL import Image

from m3i_lightning.data.views import AUGMENT_ON

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def write_jpegs(root: Path, count: int = 512, size: tuple[int, int] = (320, 240)) -> Path:
    """``count`` JPEGs (quality 90) of smooth random content in 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        path = root / f"class{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return root


def default_model(overrides: list[str]):
    """The default CPU pre-training model of the Hydra config, and that config."""
    from hydra import compose, initialize_config_dir

    from m3i_lightning.config.factory import build_model, build_tokenizer_from

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    tokenizer = build_tokenizer_from(cfg.text)
    return build_model(cfg, 4, tokenizer), cfg, tokenizer


def imagefolder_data(path: Path, cfg, tokenizer, fields: set[str], workers: int,
                     augment_on: str):
    """The ``data=imagefolder`` module with the model's fields, batch size and colour
    augmentations."""
    from m3i_lightning.data import ImageFolderData

    return ImageFolderData(str(path), img_size=cfg.backbone.img_size,
                           batch_size=cfg.data.batch_size, num_workers=workers,
                           val_fraction=0.0, tokenizer=tokenizer, fields=fields,
                           augment=cfg.data.augment, augment_on=augment_on)


def loader_images_per_s(loader) -> float:
    """Images/s of one whole epoch of ``loader``, timed from ``iter()`` (worker start-up
    included): prefetched batches cannot flatter it, as they would a per-batch median."""
    start = time.perf_counter()
    count = sum(len(batch["view1_geometry"]) for batch in loader)
    return count / (time.perf_counter() - start)


def one_worker_images_per_s(loader) -> float:
    """What one DataLoader worker delivers: the same work in this process on one thread (the
    DataLoader gives each worker one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loader_images_per_s(loader)
    finally:
        torch.set_num_threads(threads)


def step_seconds(model, batch: dict, steps: int) -> list[float]:
    """Seconds per training step (forward, backward, AdamW, the engine's EMA update), after
    one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    done = itertools.count()

    def step() -> None:
        terms, _ = model.forward_terms(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        model.update_teacher(next(done), steps + 1)

    return time_rounds({"step": step}, 1, steps, torch.device("cpu"))["step"]


def render_images_per_s(data, batch: dict, device: torch.device, repeats: int = 3) -> float:
    """Images/s of rendering the views of a device-path ``batch`` on ``device`` (median)."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items()}

    def render() -> None:
        data.on_after_batch_transfer(dict(moved), 0)

    seconds = time_rounds({"render": render}, 1, repeats, device)["render"]
    return len(batch["view1_geometry"]) / statistics.median(seconds)


def loader_rows(folder: Path, cfg, tokenizer, fields: set[str], workers: int,
                device: torch.device) -> tuple[list[dict], dict[str, float]]:
    """Rows of both ``augment_on`` paths' loaders (and of the device rendering), and the
    images/s each path feeds: its loader's, for ``device`` capped by the rendering as well
    (time per image: loader + render, the two running one after the other at worst)."""
    rows, feeds = [], {}
    for augment_on in AUGMENT_ON:
        def data(count: int, on: str = augment_on):
            return imagefolder_data(folder, cfg, tokenizer, fields, count, on)

        one = one_worker_images_per_s(data(0).train_dataloader())
        several = loader_images_per_s(data(workers).train_dataloader())
        built = "decode + 2 views" if augment_on == "workers" else "decode + uint8 + parameters"
        rows += [{"name": f"{augment_on}: loader images/s, one worker ({built})", "value": one,
                  "unit": "img/s"},
                 {"name": f"{augment_on}: loader images/s, {workers} workers (epoch incl. "
                          "start-up)", "value": several, "unit": "img/s"}]
        feeds[augment_on] = several
        if augment_on == "device":
            module = data(0)
            render = render_images_per_s(module, next(iter(module.train_dataloader())), device)
            rows.append({"name": f"device: rendering images/s on {device.type} (2 views)",
                         "value": render, "unit": "img/s"})
            feeds[augment_on] = 1 / (1 / several + 1 / render)
            rows.append({"name": "one worker: device / workers (images/s)",
                         "value": one / rows[0]["value"], "unit": "ratio"})
    return rows, feeds


def bench_data(path: Path | None = None, workers: int = 2, batches: int = 4,
               overrides: list[str] | None = None) -> list[dict]:
    """Rows ``{name, value, unit}``: images/s of one loader worker and of the loader with
    ``workers`` workers on each path, of the device rendering and of the training step;
    each path's ratio to the step."""
    model, cfg, tokenizer = default_model(overrides or [])
    fields = model.batch_fields()
    batch_size = cfg.data.batch_size
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = path or write_jpegs(Path(tmp), batches * batch_size)
        rows, feeds = loader_rows(folder, cfg, tokenizer, fields, workers, cpu)
        batch = next(iter(imagefolder_data(folder, cfg, tokenizer, fields, 0,
                                           "workers").train_dataloader()))
    train = batch_size / statistics.median(step_seconds(model, batch, batches))
    rows.append({"name": "training images/s (default CPU model)", "value": train,
                 "unit": "img/s"})
    rows += [{"name": f"{on}: loader ({workers} workers) / training step (>= 1: not the "
                      "bottleneck)", "value": feed / train, "unit": "ratio"}
             for on, feed in feeds.items()]
    return rows


def format_rows(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows)
    return "\n".join(f"{r['name']:<{width}}  {r['value']:10.2f} {r['unit']}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="an image folder (default: synthetic JPEGs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4,
                        help="batches of the synthetic folder; timed training steps")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the model config")
    args = parser.parse_args(argv)
    rows = bench_data(args.path, args.workers, args.batches, args.overrides)
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
