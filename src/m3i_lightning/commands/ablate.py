"""``python -m m3i_lightning.ablate``: does composing pay on this data? The ablation of one
composition, with the data, backbone, recipe and overrides of a normal run::

    python -m m3i_lightning.ablate experiment=cpu/m3i data=... 'seeds=[0,1,2]'
    python -m m3i_lightning.ablate 'objective=[mim_feat,clip,cls]' hydra/launcher=slurm ...

Its rows, each run once per seed, all at the run's one budget:

- the random init of the same architecture (``trainer.max_steps=0``), once for each global
  feature a row is read by (class token, mean-pooled);
- each objective alone; each composition leaving one out (for two objectives, the other one
  alone);
- the full composition, and its twin with M3I's mix switched the other way when it can mix;
- the full composition under each other weighting strategy of ``ablation.weightings``
  (``[uncertainty,pcgrad]``: Eq. 4's fixed weights against the learned and projected ones).

The rows only select objectives (and ``mix``, ``weighting``): every other value is the run's,
the objectives' own options included. Each job is a pre-training run scored by its own
end-of-run protocols (``protocols=``: kNN, linear probe, fine-tuning, segmentation...); its
folder is ``runs/<row>-seed<k>`` of the ablation folder (``hydra.run.dir``). The jobs go through
Hydra's launcher, in a multirun of this same command whose jobs read the plan
(``plan.json``): locally one after another (``ablation.sweeps=N``: N such sweeps at a time), or
on a cluster with ``hydra/launcher=slurm``. A job that fails is marked (``FAILED`` in its
folder, its line in the table) and the others go on; calling the command again with the same
``hydra.run.dir`` skips the finished jobs and runs the rest again.

It writes ``ablation.md`` and ``ablation.json``: each row's scores (mean ± std over seeds) and
gain over the random init read by its feature, each objective's marginal contribution (full
minus the composition without it), the composition's gain over the best single objective and
the interplay summary of the full composition's runs (:mod:`m3i_lightning.engine.interplay`);
and ``ablation_bars.png`` (scores with their std) and ``ablation_interplay.png`` (the full
composition's pairwise gradient cosines).
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from m3i_lightning.commands.eval import RESULTS_FILE
from m3i_lightning.commands.pretrain import check_choices, sweep_job
from m3i_lightning.commands.runfolder import FAILED_FILE, INTERPLAY_FILE
from m3i_lightning.config.factory import build_model, build_tokenizer_from, global_feature
from m3i_lightning.config.schema import check_command_line
from m3i_lightning.core.errors import ConfigError, M3IError, one_line_errors
from m3i_lightning.engine.weighting import WEIGHTINGS
from m3i_lightning.evaluation.interplay_monitor import draw_cosines

PLAN_FILE = "plan.json"
RUNS_DIR = "runs"
TABLE_FILE = "ablation.md"
SUMMARY_FILE = "ablation.json"
BARS_FILE = "ablation_bars.png"
HEATMAP_FILE = "ablation_interplay.png"
ABLATION_KEYS = ("seeds", "ablation")  # the command's own keys, not a run's
FORWARDED_HYDRA = ("hydra/launcher", "hydra.launcher", "hydra.searchpath")
SCORE_NAMES = {"knn_top1": "kNN", "linear_top1": "linear probe", "finetune_top1": "fine-tune",
               "zero_shot_top1": "zero-shot", "segmentation_miou": "segmentation mIoU"}
# pretrain's line for a failed sweep job, its overrides ending with ablation.job (sweep_command)
_FAILED_LINE = re.compile(r"^failed: job \d+ \(.*\bablation\.job=([^\s)]+)\): (.*)$")


@dataclass(frozen=True)
class Row:
    """One row of the ablation: which objectives, ``mix`` and ``weighting`` (None: the run's
    own), untrained (the random init), and the global feature evaluation reads."""

    key: str
    label: str
    kind: str  # random | single | leave_one_out | full
    objectives: tuple[str, ...]
    mix: bool | None = None
    untrained: bool = False
    feature: str = ""
    weighting: str | None = None


def row_config(cfg: DictConfig, row: Row, seed: int) -> DictConfig:
    """The run of ``row`` at ``seed``: ``cfg`` with only the row's objectives (their options as
    ``cfg`` sets them), its ``mix``, no step when untrained, and without the command's keys."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        for name in [n for n in job.objective if n not in row.objectives]:
            del job.objective[name]
        if row.mix is not None:
            job.mix = row.mix
        if row.weighting is not None:
            job.weighting = row.weighting
        if row.untrained:
            job.trainer.max_steps = 0
        job.seed = seed
        for key in ABLATION_KEYS:
            job.pop(key, None)
    return job


def can_mix(cfg: DictConfig) -> bool:
    """Whether the composition builds with M3I's mix on (input, masks, backbone allow it)."""
    mixed = copy.deepcopy(cfg)
    with open_dict(mixed):
        mixed.mix = True
    try:
        build_model(row_config(mixed, Row("", "", "full", tuple(cfg.objective)), 0), 2,
                    build_tokenizer_from(cfg.text))
    except ConfigError:
        return False
    return True


def weighting_rows(cfg: DictConfig) -> list[str]:
    """The weighting strategies of ``ablation.weightings`` other than the run's own."""
    asked = list((cfg.get("ablation") or {}).get("weightings") or [])
    unknown = [w for w in asked if w not in WEIGHTINGS]
    if unknown:
        raise ConfigError(f"ablation.weightings={asked}: unknown {unknown}; choose among "
                          f"{sorted(WEIGHTINGS)}")
    return [w for w in dict.fromkeys(asked) if w != cfg.weighting]


def plan_rows(cfg: DictConfig) -> list[Row]:
    """The rows of the ablation of ``cfg``'s composition (see the module doc), random inits
    first, each with the feature it is read by."""
    names = tuple(cfg.objective)
    if len(names) < 2:
        raise ConfigError(f"an ablation needs a composition of two or more objectives; "
                          f"objective={list(names)}")
    rows = [Row(f"only-{n}", n, "single", (n,)) for n in names]
    if len(names) > 2:
        rows += [Row(f"without-{n}", f"without {n}", "leave_one_out",
                     tuple(m for m in names if m != n)) for n in names]
    mix = bool(cfg.get("mix"))
    label = "full" + (" (mix)" if mix else "")
    rows.append(Row("full", label, "full", names))
    if mix:
        rows.append(Row("full-nomix", "full w/o mix", "full", names, mix=False))
    elif can_mix(cfg):
        rows.append(Row("full-mix", "full (mix)", "full", names, mix=True))
    rows += [Row(f"full-{w}", f"{label} ({w})", "full", names, weighting=w)
             for w in weighting_rows(cfg)]
    rows = [Row(**{**asdict(r), "feature": global_feature(row_config(cfg, r, 0))}) for r in rows]
    randoms = {}
    for row in rows:
        if row.feature not in randoms:
            slug = re.sub(r"\W+", "_", row.feature)
            randoms[row.feature] = Row(f"random-{slug}", f"random init ({row.feature})",
                                       "random", row.objectives, row.mix, True, row.feature)
    return [*randoms.values(), *rows]


# --- the jobs ------------------------------------------------------------------------------------


def job_key(row: Row, seed: int) -> str:
    return f"{row.key}-seed{seed}"


def run_job(cfg: DictConfig) -> float | None:
    """One job of the ablation's multirun: the plan's row and seed for ``ablation.job``,
    pre-trained and scored as a sweep job of the pre-training command."""
    plan = json.loads(Path(cfg.ablation.plan).read_text())
    job = plan["jobs"][cfg.ablation.job]
    return sweep_job(row_config(cfg, Row(**plan["rows"][job["row"]]), job["seed"]))


def job_outcome(folder: Path) -> dict | None:
    """``{"results": ...}`` of a finished job, ``{"failed": line}`` of a failed one, None."""
    if (folder / RESULTS_FILE).is_file():
        return {"results": json.loads((folder / RESULTS_FILE).read_text())["results"]}
    if (folder / FAILED_FILE).is_file():
        return {"failed": (folder / FAILED_FILE).read_text().strip()}
    return None


def forwarded_overrides(task: list[str], hydra_overrides: list[str]) -> list[str]:
    """The command line of the ablation's runs: every override of this command (``task``) but
    its own keys, and those of Hydra's that choose the launcher (and a search path)."""
    kept = [o for o in task
            if re.split(r"[.=]", o.lstrip("+~"), maxsplit=1)[0] not in ABLATION_KEYS]
    return [*kept, *(o for o in hydra_overrides if o.startswith(FORWARDED_HYDRA))]


def sweep_command(overrides: list[str], plan: Path, jobs: list[str], runs: Path) -> list[str]:
    return [sys.executable, "-m", "m3i_lightning.ablate", "-m", *overrides,
            f"ablation.plan='{plan}'", f"ablation.job={','.join(jobs)}",
            f"hydra.sweep.dir='{runs}'", "hydra.sweep.subdir=${ablation.job}"]


def launch(overrides: list[str], plan: Path, pending: list[str], runs: Path, sweeps: int,
           out: Path) -> None:
    """Run the ``pending`` jobs in ``sweeps`` multiruns at a time until each has finished or is
    marked failed. A sweep whose process dies (an error no job catches) marks the job it was
    running, the first of its share without an outcome, and the rest of its share run again."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // sweeps)))
    todo, attempt = list(pending), 0
    while todo:
        shares = [todo[i::sweeps] for i in range(min(sweeps, len(todo)))]
        logs = [out / f"sweep{attempt}-{i}.log" for i in range(len(shares))]
        print(f"ablation: {len(todo)} job(s) in {len(shares)} sweep(s); logs: "
              f"{', '.join(str(p) for p in logs)}", flush=True)
        processes = []
        for share, log in zip(shares, logs, strict=True):
            with open(log, "w") as handle:
                processes.append(subprocess.Popen(sweep_command(overrides, plan, share, runs),
                                                  stdout=handle, stderr=subprocess.STDOUT,
                                                  env=env))
        todo = []
        for share, log, process in zip(shares, logs, processes, strict=True):
            crashed = process.wait() not in (0, 2)
            lines = log.read_text(errors="replace").splitlines()
            failures = {m[1]: m[2] for m in map(_FAILED_LINE.match, lines) if m}
            unresolved = [key for key in share if job_outcome(runs / key) is None]
            for i, key in enumerate(unresolved):
                if crashed and i > 0:
                    todo.append(key)
                    continue
                last = next((line for line in reversed(lines) if line.strip()), "no output")
                reason = failures.get(key) or (f"the sweep stopped in this job: {last}" if crashed
                                               else f"no result; see {log}")
                (runs / key).mkdir(parents=True, exist_ok=True)
                (runs / key / FAILED_FILE).write_text(f"{reason}\n")
        attempt += 1


# --- the table -----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], seeds: int, failed: int) -> str:
    """mean ± std in percent; ``failed`` when every job failed, ``–`` when the score does not
    apply (zero-shot without an image-text objective)."""
    if not values:
        return "failed" if failed else "–"
    mean, std = mean_std(values)
    text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if len(values) > 1 else "")
    return text + (f" ({len(values)} of {seeds})" if len(values) < seeds else "")


def signed(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def summarize_ablation(rows: list[Row], seeds: list[int], runs: Path) -> dict:
    """Per row: each score's values over seeds (mean, std) and gain over its random init, the
    failed jobs' lines; the marginal contributions, the composition's gain over the best single
    objective and the full composition's interplay summary."""
    outcomes = {job_key(r, s): job_outcome(runs / job_key(r, s)) or {"failed": "not run"}
                for r in rows for s in seeds}
    scores = [k for k in SCORE_NAMES if any(k in o.get("results", {}) for o in outcomes.values())]
    table = {}
    for row in rows:
        results = [outcomes[job_key(row, s)] for s in seeds]
        values = {k: [o["results"][k] for o in results if k in o.get("results", {})]
                  for k in scores}
        table[row.key] = {"row": asdict(row), "values": values,
                          "mean_std": {k: mean_std(v) for k, v in values.items()},
                          "failed": {s: o["failed"] for s, o in zip(seeds, results, strict=True)
                                     if "failed" in o}}
    by_kind = {kind: [r for r in rows if r.kind == kind] for kind in
               ("random", "single", "leave_one_out", "full")}
    randoms = {r.feature: r.key for r in by_kind["random"]}

    def mean(key: str, score: str) -> float | None:
        found = table[key]["mean_std"].get(score)
        return None if found is None else found[0]

    def difference(a: str, b: str, score: str) -> float | None:
        x, y = mean(a, score), mean(b, score)
        return None if x is None or y is None else x - y

    for row in rows:
        table[row.key]["gain_over_random"] = {
            k: None if row.kind == "random" else difference(row.key, randoms[row.feature], k)
            for k in scores}
    full = by_kind["full"][0]
    names = full.objectives
    without = {n: next(r for r in rows if r.kind in ("leave_one_out", "single")
                       and set(r.objectives) == set(names) - {n}) for n in names}
    marginal = {n: {k: difference(full.key, without[n].key, k) for k in scores} for n in names}
    composition = {}
    for k in scores:
        singles = {r.label: mean(r.key, k) for r in by_kind["single"]
                   if mean(r.key, k) is not None}
        best = max(singles, key=singles.get) if singles else None
        composition[k] = {"best_single": best,
                          "gain": None if best is None or mean(full.key, k) is None
                          else mean(full.key, k) - singles[best]}
    records = [json.loads(p.read_text()) for s in seeds
               if (p := runs / job_key(full, s) / INTERPLAY_FILE).is_file()]
    interplay = None
    if records:
        summaries = [r["summary"] for r in records]
        interplay = {"seeds": len(records), "wrt": records[0]["wrt"],
                     "steps": summaries[0]["steps"],
                     "cos": {p: {stat: statistics.mean(s["cos"][p][stat] for s in summaries)
                                 for stat in ("mean", "first", "last")}
                             for p in summaries[0]["cos"]},
                     **{part: {n: statistics.mean(s[part][n] for s in summaries) for n in names}
                        for part in ("share", "norm", "cos_sum")}}
    return {"scores": scores, "seeds": seeds, "rows": table, "marginal": marginal,
            "composition": composition, "interplay": interplay, "full": full.key}


def markdown(summary: dict, budget: str) -> str:
    scores, seeds = summary["scores"], summary["seeds"]
    lines = [f"Ablation: {budget}; mean ± std over seeds {seeds}, top-1 (%) on the held-out "
             "split; 'vs random': the gain over the random init read by the same feature.", "",
             "| row | objectives | read by | "
             + " | ".join(f"{SCORE_NAMES[k]} | vs random" for k in scores) + " |",
             "|---|---|---|" + "---|---|" * len(scores)]
    for entry in summary["rows"].values():
        row = entry["row"]
        cells = [f"{cell(entry['values'][k], len(seeds), len(entry['failed']))} | "
                 f"{signed(entry['gain_over_random'][k])}" for k in scores]
        objectives = "none" if row["untrained"] else ", ".join(row["objectives"])
        lines.append(f"| {row['label']} | {objectives} | {row['feature']} | "
                     + " | ".join(cells) + " |")
    failures = [f"- {e['row']['label']}, seed {s}: {line}"
                for e in summary["rows"].values() for s, line in e["failed"].items()]
    if failures:
        lines += ["", "Failed jobs:", *failures]
    full = summary["rows"][summary["full"]]["row"]["label"]
    lines += ["", f"Marginal contribution ({full} minus the composition without it):", "",
              "| objective | " + " | ".join(SCORE_NAMES[k] for k in scores) + " |",
              "|---|" + "---|" * len(scores)]
    for name, gains in summary["marginal"].items():
        lines.append(f"| {name} | " + " | ".join(signed(gains[k]) or "–" for k in scores) + " |")
    lines += ["", f"{full} against the best single objective: "
              + "; ".join(f"{SCORE_NAMES[k]} {signed(c['gain']) or '–'} (best single: "
                          f"{c['best_single'] or '–'})"
                          for k, c in summary["composition"].items())]
    interplay = summary["interplay"]
    if interplay is None:
        lines += ["", f"Interplay: not measured in the {full} runs (interplay.every_n_steps)."]
    else:
        lines += ["", f"Interplay of {full} (gradients w.r.t. the {interplay['wrt']}, "
                  f"{len(interplay['steps'])} measured steps, mean over {interplay['seeds']} "
                  "seed(s)):", "", "| pair | cosine, mean | first | last |", "|---|---|---|---|"]
        lines += [f"| {pair} | {c['mean']:+.3f} | {c['first']:+.3f} | {c['last']:+.3f} |"
                  for pair, c in interplay["cos"].items()]
        lines += ["", "| objective | share of the step | gradient norm | cosine with the step |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {interplay['share'][n]:+.3f} | {interplay['norm'][n]:.3g} | "
                  f"{interplay['cos_sum'][n]:+.3f} |" for n in interplay["share"]]
    return "\n".join(lines) + "\n"


def draw_bars(summary: dict, path: Path) -> Path:
    """One panel per score: each row's mean with its std over seeds as an error bar; random
    inits in gray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, entries = summary["scores"], list(summary["rows"].values())
    fig, axes = plt.subplots(1, len(scores), figsize=(1.2 + 0.55 * len(entries) * len(scores),
                                                      4.5), dpi=100, squeeze=False,
                             layout="constrained")
    for axis, score in zip(axes[0], scores, strict=True):
        found = [e["mean_std"][score] or (0.0, 0.0) for e in entries]
        colours = ["0.6" if e["row"]["kind"] == "random" else
                   "tab:orange" if e["row"]["kind"] == "full" else "tab:blue" for e in entries]
        axis.bar(range(len(entries)), [100 * m for m, _ in found],
                 yerr=[100 * s for _, s in found], color=colours, capsize=3)
        axis.set_xticks(range(len(entries)), [e["row"]["label"] for e in entries],
                        rotation=40, ha="right", fontsize=8)
        axis.set(title=SCORE_NAMES[score], ylabel="top-1 (%)")
        axis.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def budget_line(cfg: DictConfig) -> str:
    trainer = cfg.trainer
    length = (f"{trainer.max_steps} steps" if trainer.max_steps and trainer.max_steps > 0
              else f"{trainer.max_epochs} epochs")
    batch = cfg.get("global_batch_size") or cfg.data.batch_size
    return f"{length} of batch {batch} on data={cfg.data.get('name') or cfg.data.get('module')}"


def ablate(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    runs, plan_path = out / RUNS_DIR, out / PLAN_FILE
    sweeps = cfg.ablation.sweeps
    if not isinstance(sweeps, int) or isinstance(sweeps, bool) or sweeps < 1:
        raise ConfigError(f"ablation.sweeps={sweeps} must be a whole number >= 1")
    seeds = list(cfg.seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds={seeds} must be a list of whole numbers")
    rows = plan_rows(cfg)
    given = HydraConfig.get().overrides
    overrides = forwarded_overrides(list(given.task), list(given.hydra))
    plan = {"overrides": overrides, "rows": {r.key: asdict(r) for r in rows},
            "jobs": {job_key(r, s): {"row": r.key, "seed": s} for r in rows for s in seeds}}
    if plan_path.is_file():
        earlier = json.loads(plan_path.read_text())
        planned = {k: asdict(Row(**v)) for k, v in earlier["rows"].items()}
        if earlier["overrides"] != overrides or json.loads(json.dumps(planned)) != json.loads(
                json.dumps(plan["rows"])):
            raise ConfigError(f"{out} holds an ablation of other settings "
                              f"({' '.join(earlier['overrides'])}): run again with those, or "
                              "give another hydra.run.dir")
        plan["jobs"] = {**earlier["jobs"], **plan["jobs"]}
    out.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=1))
    pending = [key for key in plan["jobs"] if key.rsplit("-seed", 1)[1] in map(str, seeds)
               and (job_outcome(runs / key) or {}).get("results") is None]
    done = len(rows) * len(seeds) - len(pending)
    print(f"ablation of {list(cfg.objective)}: {len(rows)} rows x {len(seeds)} seeds; "
          f"{done} finished, {len(pending)} to run", flush=True)
    for key in pending:
        (runs / key / FAILED_FILE).unlink(missing_ok=True)
    if pending:
        launch(overrides, plan_path, pending, runs, sweeps, out)
    summary = summarize_ablation(rows, seeds, runs)
    table = markdown(summary, budget_line(cfg))
    (out / TABLE_FILE).write_text(table)
    (out / SUMMARY_FILE).write_text(json.dumps({"budget": budget_line(cfg), **summary},
                                               indent=1))
    draw_bars(summary, out / BARS_FILE)
    full = next(r for r in rows if r.kind == "full")
    records = [p for s in seeds if (p := runs / job_key(full, s) / INTERPLAY_FILE).is_file()]
    if records:
        draw_cosines(json.loads(records[0].read_text()), out / HEATMAP_FILE,
                     f"{full.label}: gradient cosines ({records[0].parent.name})")
    print(table)
    print(f"ablation folder: {out}")
    failed = sum(len(e["failed"]) for e in summary["rows"].values())
    if failed:
        raise M3IError(f"{failed} of {len(rows) * len(seeds)} ablation jobs failed (the table "
                       f"lists them, each folder holds {FAILED_FILE}): {out / TABLE_FILE}")
    return summary


@hydra.main(config_path="../conf", config_name="ablate", version_base="1.3")
@one_line_errors
def hydra_main(cfg: DictConfig) -> float | dict | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_job(cfg)
    return ablate(cfg)


@one_line_errors
def main() -> None:
    """``python -m m3i_lightning.ablate`` / ``m3i-ablate``: the names and keys of the command
    line checked, then the ablation (or, in its sweep, one job)."""
    check_choices(sys.argv[1:])
    check_command_line("ablate", sys.argv[1:])
    hydra_main()
