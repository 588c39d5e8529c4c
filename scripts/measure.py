"""Tools to measure a training step: its host-device syncs, its peak memory, how often a module
runs, and timing rounds that interleave configurations so that the load of a shared machine
hits them all alike. ``scripts/benchmark.py`` is built on them."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device on CUDA: reading a value
    (``item``, ``bool``, ``tolist``), data-dependent shapes (``nonzero``, boolean indexing,
    ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``), ``equal``.
    They are counted wherever the code runs, so a CPU run shows what would stall a GPU."""

    READS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2",
                       "unique_dim", "unique_consecutive", "equal", "bincount"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += self.waits(func.overloadpacket.__name__, args, kwargs)
        return func(*args, **kwargs)

    def waits(self, name: str, args: tuple, kwargs: dict) -> bool:
        if name in self.READS:
            return True
        if name == "repeat_interleave":
            return kwargs.get("output_size") is None
        if name.startswith("index") and len(args) > 1 and isinstance(args[1], list | tuple):
            return any(t is not None and t.dtype == torch.bool for t in args[1])
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """How far the enclosed code raises memory above what is held when it starts (``rise``,
    bytes; None where it cannot be measured).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the kernel's high-water mark of the
    resident set (VmHWM), reset through /proc/self/clear_refs (Linux). glibc keeps freed
    blocks resident for reuse, which would hide a peak built from them, so free heap pages
    are first handed back (``malloc_trim``): whatever the code then touches counts.
    """

    METHOD = {
        "cpu": "weights + rise of the resident set's high-water mark in the first step "
               "(VmHWM after malloc_trim, reset by /proc/self/clear_refs)",
        "cuda": "weights + rise of torch.cuda.max_memory_allocated in the first step"}

    def __init__(self, device: torch.device) -> None:
        self.device, self.base, self.rise = device, None, None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _read_status("VmRSS")
        except (OSError, AttributeError, KeyError):
            self.base = None
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.rise = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.rise = _read_status("VmHWM") - self.base


@contextlib.contextmanager
def count_calls(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, int]]:
    """How many times each module's forward runs inside the block (an encoder's passes, given
    its stack of blocks): a forward pre-hook per module, removed on the way out."""
    calls = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable:
        def hook(*_) -> None:
            calls[name] += 1
        return hook

    hooks = [module.register_forward_pre_hook(counter(name)) for name, module in modules.items()]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_rounds(steps: Mapping[str, Callable[[], None]], warmup: int, repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns in their given order, round after
    round (``warmup`` untimed rounds first): a burst of load falls on one round of all of them
    rather than on all the repeats of one."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of the per-round ratios of two timings from :func:`time_rounds`."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))
