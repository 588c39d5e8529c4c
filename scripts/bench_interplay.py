"""What the interplay monitor costs: one measurement against one training step, in one run.

    python scripts/benchmark.py --interplay [--every 50] [--repeats 5] [--batch-size 32]
                                            [--set KEY=VALUE ...] [--json FILE]

For the default composition ``[mim_feat, clip, cls]`` and for M3I's CPU recipe it steps the
training step (forward, backward, AdamW, EMA: :class:`benchmark.Case`) and the monitor's
measurement (:func:`m3i_lightning.engine.interplay.measure`: one forward of the step and one
backward per objective, w.r.t. the encoder and w.r.t. the tokens) in interleaved rounds on the
same batch. A logged step costs 1 + ratio steps; a run measuring every ``--every`` steps pays
ratio / every on top of its training. On CPU torch runs one thread (see benchmark.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from benchmark import Spec, build_case
from measure import median_ratio, time_rounds

from m3i_lightning.engine.interplay import WRT, measure

CONFIGS = {"[mim_feat,clip,cls]": ["objective=[mim_feat,clip,cls]"],
           "experiment=cpu/m3i": ["experiment=cpu/m3i"]}


def bench(label: str, overrides: list[str], batch_size: int, extra: list[str],
          device: torch.device, repeats: int, every: int) -> list[dict]:
    case = build_case(Spec("vit_cpu", label, overrides, batch_size), extra, device)
    steps = {"step": case.step, **{wrt: (lambda w=wrt: measure(case.model, case.batch, w))
                                   for wrt in WRT}}
    times = time_rounds(steps, 1, repeats, device)
    rows = []
    for wrt in WRT:
        ratio = median_ratio(times[wrt], times["step"])
        rows.append({"config": label, "wrt": wrt, "batch_size": batch_size,
                     "objectives": len(case.model.heads),
                     "step_ms": 1000 * statistics.median(times["step"]),
                     "measure_ms": 1000 * statistics.median(times[wrt]),
                     "measure_per_step": ratio, "every": every, "run_overhead": ratio / every})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=50,
                        help="the interval whose per-run cost is stated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = [row for label, overrides in CONFIGS.items()
            for row in bench(label, overrides, args.batch_size, args.set, device, args.repeats,
                             args.every)]
    print(f"device: {device}, threads: {torch.get_num_threads()}, median of {args.repeats} "
          "interleaved rounds")
    print(f"{'configuration':<22} {'wrt':<8} {'K':>2} {'step ms':>8} {'measure ms':>10} "
          f"{'measure/step':>12} {'run cost at every ' + str(args.every):>22}")
    for r in rows:
        print(f"{r['config']:<22} {r['wrt']:<8} {r['objectives']:>2} {r['step_ms']:>8.1f} "
              f"{r['measure_ms']:>10.1f} {r['measure_per_step']:>12.2f} "
              f"{100 * r['run_overhead']:>21.1f}%")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
