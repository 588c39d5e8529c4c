"""Data-loading benchmark: the input pipeline against torchvision's, and against the step.

    python scripts/bench_data.py [--path DIR] [--images 64] [--rounds 5] [--gpu-rate 2500]
                                 [--workers 2] [--batches 4] [--json FILE]

First, the 224 px pipeline against torchvision's in one run (:func:`torchvision_rows`): on the
same images, one thread, the configurations interleaved round by round, each building the
views of every image, collating them into batches of 32 and shipping each batch as a loader
worker does (pickled for the result queue, tensors moved to shared memory). For BYOL's two
views (crop scale 0.08–1, BYOL's colour augmentations) and MAE's one view (crop scale 0.2–1,
bicubic, no colour): torchvision's ``ImageFolder`` with the ``transforms.v2`` pipeline a user
would write (on the PIL image, and on a uint8 tensor after ``ToImage``), the worker path of
``data=imagefolder`` (one decode at reduced DCT scale, 8-bit crops, the shared colour
formulas), and the CPU share of the device path (the worker reads the file and ships the JPEG
bytes when the device decodes with nvJPEG; on a CPU, or for formats nvJPEG cannot read, it
decodes at reduced scale and ships a uint8 image), with the device's rendering cost on this
CPU beside it. Printed: images/s per thread, the ratio to the faster torchvision pipeline and
the threads (loader workers) needed to feed ``--gpu-rate`` images/s (ViT-B/16 on an H100:
about 2,500). The images are real photos where the machine has them (scikit-image's, else
scikit-learn's two sample photos), cut into ``--images`` 500×375 JPEGs (ImageNet's typical
size), else synthetic JPEGs of that size.

Then the loader against the step, on the default CPU model (``backbone=vit_cpu``,
``[mim_feat, clip, cls]``, the default batch size), for each ``data.augment_on`` path
(``workers``: the worker decodes and builds both views; ``device``: it decodes and ships the
uint8 image and the views' parameters, which the step renders,
:mod:`m3i_lightning.data.device_views`):

1. loader images/s of one worker, through the real ``data=imagefolder`` path, on one thread;
2. loader images/s with ``--workers`` workers, over a whole epoch including their start-up;
3. for ``device``: images/s of rendering the views of a batch on this machine's device;
4. training images/s: forward, backward, optimizer step and EMA update of the same model on
   a batch from that loader;
5. the ratios: one worker of ``device`` over one of ``workers`` (measured in this one run),
   and per path the loader over the step (for ``device`` the step plus its rendering): the
   loader is not the bottleneck when the second is ≥ 1.

Without ``--path`` it writes enough JPEGs of 320×240 with smooth random content to a
temporary folder (``--batches`` batches). Loader and step are timed one after the other (the
step: median after a warm-up), so on a shared machine both see similar load; while training,
the workers compete with the step for the same cores.
``main`` is a section of ``scripts/benchmark.py --data``; ``bench_data`` returns rows, and
``loader_rows`` the loader's part for another step (``scripts/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory pickling of tensors)
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


PHOTO_SIZE = (500, 375)
VIEW_SIZE = 224
SHIP_BATCH = 32
RECIPES = {"BYOL 2 views": dict(crop_scale=(0.08, 1.0), augment="byol", fields={"view1", "view2"}),
           "MAE 1 view": dict(crop_scale=(0.2, 1.0), augment="none", fields={"view1"},
                              interpolation="bicubic")}


def photos() -> tuple[list[np.ndarray], str]:
    """Real photos as uint8 [H, W, 3] arrays, and where they come from (none: no photos)."""
    try:
        from skimage import data

        return ([getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")],
                "scikit-image's photos")
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images), "scikit-learn's two sample photos"
    except ImportError:
        return [], "synthetic"


def write_photos(root: Path, count: int) -> str:
    """``count`` 500×375 JPEGs (quality 90) in 2 class folders: windows at random places of
    the real photos (mirrored at random), else smooth random content; returns which."""
    sources, origin = photos()
    sources = [p for p in sources if p.shape[0] >= PHOTO_SIZE[1] and p.shape[1] >= PHOTO_SIZE[0]]
    rng = np.random.default_rng(0)
    width, height = PHOTO_SIZE
    for i in range(count):
        if sources:
            photo = sources[i % len(sources)]
            top = rng.integers(0, photo.shape[0] - height + 1)
            left = rng.integers(0, photo.shape[1] - width + 1)
            window = photo[top:top + height, left:left + width]
            image = Image.fromarray(window[:, ::-1] if rng.random() < 0.5 else window)
        else:
            coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize(PHOTO_SIZE, Image.BICUBIC)
        path = root / f"class{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(path, quality=90)
    return (f"{count} {width}×{height} JPEGs (quality 90) of "
            f"{origin if sources else 'synthetic content'}")


def torchvision_views(recipe: str, on_tensor: bool) -> Callable:
    """torchvision's ``transforms.v2`` equivalent of ``recipe`` as a user would write it for
    ``ImageFolder`` (PIL images): each view crops, flips and recolours, then ``ToImage`` →
    float → normalise; ``on_tensor``: the image becomes a uint8 tensor first (``ToImage``
    once, the v2 docs' advice) and the views work on it."""
    import torchvision.transforms.v2 as T

    finish = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)]
    if recipe.startswith("MAE"):
        views = [T.Compose([T.RandomResizedCrop(VIEW_SIZE, scale=(0.2, 1.0),
                                                interpolation=T.InterpolationMode.BICUBIC),
                            T.RandomHorizontalFlip(), *finish])]
    else:
        def byol(blur: float, solarize: float) -> T.Compose:
            return T.Compose([
                T.RandomResizedCrop(VIEW_SIZE, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(0.2),
                T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur),
                T.RandomSolarize(128, p=solarize), *finish])  # 8-bit input: 128 is 0.5

        views = [byol(1.0, 0.0), byol(0.1, 0.2)]
    first = T.ToImage() if on_tensor else (lambda image: image)
    return lambda image: [view(first(image)) for view in views]


def shipped(batch) -> None:
    """What a loader worker does with a batch: pickle it for the result queue, its tensors
    moved to shared memory."""
    ForkingPickler.dumps(batch)


def torchvision_pass(dataset, indices: range) -> Callable[[], None]:
    """One pass over ``indices`` of torchvision's ``ImageFolder``: build, collate, ship."""
    from torch.utils.data import default_collate

    def run() -> None:
        for start in range(0, len(indices), SHIP_BATCH):
            shipped(default_collate([dataset[i] for i in indices[start:start + SHIP_BATCH]]))

    return run


def m3i_pass(dataset, collate, indices: range) -> Callable[[], None]:
    """One pass of a ``ViewDataset`` (each pass new seeds): build, collate, ship."""
    seeds = itertools.count()

    def run() -> None:
        for start in range(0, len(indices), SHIP_BATCH):
            shipped(collate([dataset[(i, next(seeds))] for i in indices[start:start + SHIP_BATCH]]))

    return run


def m3i_data(folder: Path, recipe: dict, augment_on: str, device_decodes: bool = False):
    """``data=imagefolder`` at 224 px for ``recipe`` and its training dataset, without loader
    processes; on the device path JPEGs decode on the device when ``device_decodes`` (as
    with nvJPEG on a GPU), and it crops bilinearly (``roi_align``)."""
    from m3i_lightning.data import ImageFolderData

    if augment_on == "device":
        recipe = {**recipe, "interpolation": "bilinear"}
    data = ImageFolderData(str(folder), img_size=VIEW_SIZE, batch_size=SHIP_BATCH,
                           num_workers=0, val_fraction=0.0, augment_on=augment_on, **recipe)
    dataset = data.train_dataloader().dataset  # on this CPU the module chose: workers decode
    data.view.device_decodes = device_decodes
    return data, dataset


def torchvision_rows(folder: Path, images: int, rounds: int, gpu_rate: float,
                     origin: str) -> tuple[list[dict], str]:
    """Rows ``{name, value, unit}`` and the printed table of the comparison with torchvision
    (see the module docstring)."""
    from torchvision.datasets import ImageFolder

    from m3i_lightning.data.dataset import Collate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, lines = [], []
    try:
        for recipe, options in RECIPES.items():
            steps, names = {}, {}
            for on_tensor in (False, True):
                dataset = ImageFolder(str(folder), transform=torchvision_views(recipe, on_tensor))
                key = f"torchvision ImageFolder + v2 ({'uint8 tensor' if on_tensor else 'PIL'})"
                steps[key] = torchvision_pass(dataset, range(min(images, len(dataset))))
                names[key] = "torchvision"
            paths = {"m3i workers: reduced-scale decode, 8-bit crops": ("workers", False),
                     "m3i device, CPU share: read + ship JPEG bytes (nvJPEG decodes)":
                         ("device", True),
                     "m3i device, CPU share: reduced-scale decode + ship 320 px uint8":
                         ("device", False)}
            for key, (on, device_decodes) in paths.items():
                _, dataset = m3i_data(folder, options, on, device_decodes)
                steps[key] = m3i_pass(dataset, Collate(), range(min(images, len(dataset))))
                names[key] = "m3i"
            seconds = time_rounds(steps, 1, rounds, torch.device("cpu"))
            rates = {key: images / statistics.median(times) for key, times in seconds.items()}
            baseline = max(rate for key, rate in rates.items() if names[key] == "torchvision")
            data, dataset = m3i_data(folder, options, "device")
            batch = Collate()([dataset[(i % len(dataset), i)] for i in range(SHIP_BATCH)])
            rates["m3i device: rendering the views on this CPU (beside the CPU share)"] = (
                render_images_per_s(data, batch, torch.device("cpu"), rounds))
            lines.append(f"\n{recipe}, {VIEW_SIZE} px")
            lines.append(f"| path | images/s per thread | × torchvision | threads for "
                         f"{gpu_rate:,.0f} img/s |")
            lines.append("|---|---:|---:|---:|")
            for key, rate in rates.items():
                ratio, needed = rate / baseline, math.ceil(gpu_rate / rate)
                lines.append(f"| {key} | {rate:.1f} | {ratio:.2f} | {needed} |")
                rows += [{"name": f"{recipe}: {key}: images/s per thread", "value": rate,
                          "unit": "img/s"},
                         {"name": f"{recipe}: {key}: ratio to torchvision", "value": ratio,
                          "unit": "ratio"},
                         {"name": f"{recipe}: {key}: threads for {gpu_rate:.0f} img/s",
                          "value": needed, "unit": "threads"}]
    finally:
        torch.set_num_threads(threads)
    header = (f"Input pipeline against torchvision: {origin}; one thread, {rounds} interleaved "
              f"rounds (median), batches of {SHIP_BATCH} collated and shipped as a loader "
              "worker does; × torchvision: against the faster of its two pipelines")
    return rows, "\n".join([header, *lines])


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


def train_loader(module, device: torch.device):
    """The module's training loader, JPEGs decoded where a trainer on ``device`` would have
    the data module decode them (the device path on a CUDA device with nvJPEG: there)."""
    from m3i_lightning.data.device_views import choose_decoder

    loader = module.train_dataloader()
    module.view.device_decodes = module.view.on_device and choose_decoder(device)[0]
    return loader


def loader_rows(folder: Path, cfg, tokenizer, fields: set[str], workers: int,
                device: torch.device) -> tuple[list[dict], dict[str, float]]:
    """Rows of both ``augment_on`` paths' loaders (and of the device rendering), and the
    images/s each path feeds: its loader's, for ``device`` capped by the rendering as well
    (time per image: loader + render, the two running one after the other at worst)."""
    rows, feeds = [], {}
    for augment_on in AUGMENT_ON:
        def data(count: int, on: str = augment_on):
            return imagefolder_data(folder, cfg, tokenizer, fields, count, on)

        one_worker = data(0)
        one = one_worker_images_per_s(train_loader(one_worker, device))
        several = loader_images_per_s(train_loader(data(workers), device))
        built = {"workers": "decode + 2 views", "device": "decode + uint8 + parameters"}[
            augment_on]
        if one_worker.view.device_decodes:
            built = "read + JPEG bytes + parameters"
        rows += [{"name": f"{augment_on}: loader images/s, one worker ({built})", "value": one,
                  "unit": "img/s"},
                 {"name": f"{augment_on}: loader images/s, {workers} workers (epoch incl. "
                          "start-up)", "value": several, "unit": "img/s"}]
        feeds[augment_on] = several
        if augment_on == "device":
            module = data(0)
            render = render_images_per_s(module, next(iter(train_loader(module, device))),
                                         device)
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
    parser.add_argument("--path", type=Path, help="an image folder (default: synthetic JPEGs "
                        "for the step section, photos for the torchvision comparison)")
    parser.add_argument("--images", type=int, default=64,
                        help="images of the torchvision comparison (each round builds all)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds of the torchvision comparison")
    parser.add_argument("--gpu-rate", type=float, default=2500.0,
                        help="images/s the loader must feed (default: ViT-B/16 on an H100)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4,
                        help="batches of the synthetic folder; timed training steps")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the model config")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.path or Path(tmp)
        origin = f"the images under {args.path}" if args.path else write_photos(folder,
                                                                                args.images)
        compared, table = torchvision_rows(folder, args.images, args.rounds, args.gpu_rate,
                                           origin)
    print(table, flush=True)
    rows = compared + bench_data(args.path, args.workers, args.batches, args.overrides)
    print(format_rows(rows[len(compared):]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
