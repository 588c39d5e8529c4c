"""Peak memory of the chunked kNN: bounded by the chunk size, not by the number of queries.

    python scripts/bench_eval.py [--bank 200000] [--dim 384] [--queries 2000 20000]
                                 [--chunk-sizes 256 1024 4096] [--device cpu] [--json FILE]

For each (queries, chunk size) it runs ``knn_predict`` on random float32 features and reports
the peak memory above what the bank and queries already hold: on a GPU the allocator's peak
(``torch.cuda.max_memory_allocated``), on the CPU the peak resident set of the process (Linux
``VmHWM``, reset before each run through ``/proc/self/clear_refs``). The model of that figure:
one normalised copy of the bank, chunk size × bank rows similarities and the queries × classes
scores it returns, all float32; the dense computation would hold queries × bank rows
(20k × 200k: 16 GB). ``main`` is also the ``--eval`` section of ``scripts/benchmark.py``
(``python scripts/benchmark.py --eval --bank ...``); ``knn_memory`` returns one row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m3i_lightning.evaluation.knn import knn_predict

MB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_above_baseline(device: torch.device, run) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    baseline = _status("VmRSS")
    run()
    return _status("VmHWM") - baseline


def knn_memory(bank_rows: int, dim: int, queries: int, chunk_size: int | None, k: int = 20,
               num_classes: int = 1000, device: str = "cpu", seed: int = 0) -> dict:
    """Peak extra memory (bytes) and time of one kNN, with the figure the chunking predicts."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    bank = torch.randn(bank_rows, dim, generator=g, device=device)
    labels = torch.randint(num_classes, (bank_rows,), generator=g, device=device)
    query = torch.randn(queries, dim, generator=g, device=device)
    start = time.perf_counter()
    peak = _peak_above_baseline(device, lambda: knn_predict(bank, labels, query, num_classes, k,
                                                            chunk_size=chunk_size))
    chunk = queries if chunk_size is None else min(chunk_size, queries)
    predicted = 4 * (bank_rows * dim + chunk * bank_rows + queries * num_classes)
    return {"bank": bank_rows, "dim": dim, "queries": queries, "chunk_size": chunk_size,
            "device": device.type, "peak_mb": peak / MB, "predicted_mb": predicted / MB,
            "dense_mb": 4 * queries * bank_rows / MB, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    print("| bank × dim | queries | chunk | peak above inputs (MB) | model (MB) | dense (MB) "
          "| s |\n|---|---|---|---|---|---|---|")
    rows = []
    for queries in args.queries:
        for chunk in args.chunk_sizes:
            row = knn_memory(args.bank, args.dim, queries, chunk, device=args.device)
            rows.append(row)
            print(f"| {args.bank} × {args.dim} | {queries} | {chunk} | {row['peak_mb']:.0f} "
                  f"| {row['predicted_mb']:.0f} | {row['dense_mb']:.0f} | {row['seconds']:.1f} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
