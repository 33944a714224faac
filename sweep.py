"""Grid sweeps of train.py: one run per combination of values and seed, resumable, summarised.

    uv run python sweep.py --grid lmbda=0,0.5,1 beta=0,0.5,1 learning_rate=1e-5,1e-4 --seeds 3 -- --max-steps 50
    uv run python sweep.py --grid lmbda=0,1 --dry-run --launcher "accelerate launch --num_processes 8" -- ...
    uv run python sweep.py --summarize dump/sweep/results
    uv run python sweep.py --summarize dump/sweep/results --compare lmbda=0 lmbda=1

Every run is ``train.py [flags after --] --KEY VALUE ... --seed S --output_dir ROOT/NAME``
with NAME built from the swept values and the seed (``lmbda0.5_beta0_lr1e-05_seed42``). All
runs are validated before any starts. A finished run is skipped, an interrupted one
resumed (``--resume``); runs go one after another here, and ``--dry-run`` prints those left to
run, one command per line, for a cluster scheduler. ``--eval "FLAGS"`` runs eval.py on each finished
run (teacher and ptq rows come from eval.py's cache after the first).

Each run leaves ``RESULTS/NAME.json`` (small: settings, learning curve, final metrics,
evaluation, commands): commit them, and ``--summarize RESULTS`` rebuilds the summary
(``summary.md``, ``summary.json``, plots) from them alone, on any machine; with
``--compare A B`` it also tests setting B against setting A over their seeds (Welch's CI).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from errors import BadInput

log = logging.getLogger("sweep")

ROOT = Path(__file__).resolve().parent
# Chosen per run by the sweep itself.
RESERVED = {"output_dir", "resume", "overwrite", "seed", "config"}
SHORT_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "ga",
               "max_new_tokens": "new", "quant_type": "", "group_size": "g"}
# Fields of a result's "final" entry that the summary aggregates over seeds.
SUMMARY_METRICS = ("heldout_kl", "heldout_kl_gap_closed", "teacher_nll_of_student", "teacher_nll_gap_closed",
                   "ppl", "ppl_gap_closed", "bench_avg", "bench_gap_closed", "train_min", "tokens_generated")


# ---------------------------------------------------------------- the grid

def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """KEY=V1,V2 items as {train.py field: [values as typed]}; keys in either spelling."""
    import train

    known = {f.name for f in fields(train.TrainConfig)}
    aliases = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size"}
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        name = aliases.get(key.strip().lstrip("-").replace("-", "_"), key.strip().lstrip("-").replace("-", "_"))
        if not sep or not key:
            raise BadInput(f"--grid item {item!r} is not KEY=V1,V2,...")
        if name not in known:
            raise BadInput(f"--grid key {key!r} is not a train.py flag (see train.py --help)")
        if name in RESERVED - {"seed"}:
            raise BadInput(f"--grid key {key!r} is set by the sweep for each run; it cannot be swept")
        if name in grid:
            raise BadInput(f"--grid key {key!r} is given twice")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not listed:
            raise BadInput(f"--grid key {key!r} has no values")
        grid[name] = listed
    return grid


def run_name(values: dict[str, str], seed: int) -> str:
    parts = []
    for key, value in values.items():
        text = value
        try:
            text = f"{float(value):g}"
        except ValueError:
            pass
        parts.append(SHORT_NAMES.get(key, key) + text.replace("/", "_"))  # a path's "/" would nest directories
    return "_".join(parts + [f"seed{seed}"])


def _flag_name(token: str) -> str | None:
    """The train.py field a command-line token names (``--output-dir=x`` -> output_dir)."""
    return token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None


def flag_with_value(key: str, value: str) -> list[str]:
    """train.py's flag setting ``key`` to ``value``; an on/off flag's true/false as --flag/--no-flag."""
    import train

    flag = key.replace('_', '-')
    if isinstance(getattr(train.TrainConfig, key, None), bool):
        if value.lower() not in ("true", "false"):
            raise BadInput(f"--grid {key} is on or off: give true or false, got {value!r}")
        return [f"--{flag}" if value.lower() == "true" else f"--no-{flag}"]
    return [f"--{flag}", value]


def plan_runs(grid: dict[str, list[str]], seeds: int, train_flags: list[str], root: Path,
              results_dir: Path | None = None) -> list[dict]:
    """Every run of the grid with its train.py arguments, validated by train.py's own parser,
    and what to do with it: 'train', 'resume', 'done', or 'recorded' (no run directory here,
    but a finished result of the same configuration in ``results_dir``: another machine or
    session ran it). Raises BadInput on the first run train.py would refuse or whose
    directory or result holds a different configuration."""
    import itertools

    import train

    for token in train_flags:
        if _flag_name(token) in RESERVED:
            raise BadInput(f"{token.split('=')[0]} after -- is set by the sweep for each run; use --root for "
                           f"the output directories and --seeds or --grid seed=... for seeds")
    try:
        base = train.parse_config(train_flags)
    except BadInput as e:
        raise BadInput(f"train.py flags after --: {e}") from None
    seed_values = grid.pop("seed", None) or [str(base.seed + i) for i in range(seeds)]
    runs = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        for seed in seed_values:
            try:
                seed_number = int(seed)
            except ValueError:
                raise BadInput(f"seed {seed!r} is not an integer") from None
            name = run_name(values, seed_number)
            if any(r["name"] == name for r in runs):
                raise BadInput(f"two runs of the grid would both be named {name}; give values that differ "
                               f"in more than '/' and '_'")
            output_dir = root / name
            argv = [*train_flags]
            for key, value in values.items():
                argv += flag_with_value(key, value)
            argv += ["--seed", str(seed_number), "--output_dir", str(output_dir)]
            try:
                config = train.parse_config(argv)
            except BadInput as e:
                raise BadInput(f"run {name}: {e}") from None
            model = config.model
            if model and not Path(model).exists() and (model.endswith(".gguf") or model.startswith((".", "/"))):
                raise BadInput(f"run {name}: model path {model!r} does not exist")
            runs.append({"name": name, "values": {**values, "seed": seed_number}, "argv": argv, "config": config,
                         "output_dir": output_dir,
                         "action": run_action(config, output_dir, results_dir and results_dir / f"{name}.json")})
    return runs


def run_action(config, output_dir: Path, result_file: Path | None = None) -> str:
    import checkpoints

    if not output_dir.exists() or not any(output_dir.iterdir()):
        if result_file is None or not result_file.exists():
            return "train"
        recorded = json.loads(result_file.read_text())
        differ = checkpoints.config_differences(recorded["config"], config)
        if differ:
            raise BadInput(f"{result_file} records a run with a different configuration ({', '.join(differ)}); "
                           f"remove it or choose another --results")
        return "recorded" if recorded["final"].get("step", 0) >= config.max_steps else "train"
    saved = output_dir / "run_config.json"
    if saved.exists():
        differ = checkpoints.config_differences(json.loads(saved.read_text()), config)
        if differ:
            raise BadInput(f"{output_dir} holds a run with a different configuration ({', '.join(differ)}); "
                           f"remove it or choose another --root")
    latest = checkpoints.latest_checkpoint(output_dir)
    if latest is not None and json.loads((latest / "trainer_state.json").read_text())["step"] >= config.max_steps:
        return "done"
    return "resume"


def _script(name: str) -> str:
    """train.py / eval.py as the commands name them: relative from the project root."""
    return name if Path.cwd().resolve() == ROOT else str(ROOT / name)


def train_command(launcher: str, run: dict) -> list[str]:
    argv = run["argv"] + (["--resume"] if run["action"] == "resume" else [])
    launch = shlex.split(launcher)
    # accelerate launch decides the mixed precision and train.py refuses a different one: a run
    # of --mixed-precision bf16 launches with it, unless the launcher says so itself
    precision = run["config"].mixed_precision
    if launch[:2] == ["accelerate", "launch"] and precision != "no" and \
            not any(a.split("=")[0] in ("--mixed_precision", "--mixed-precision") for a in launch):
        launch += ["--mixed_precision", precision]
    return [*launch, _script("train.py"), *argv]


def eval_command(run: dict, eval_flags: str) -> list[str]:
    return ["python", _script("eval.py"), str(run["output_dir"]), "--output-dir", str(run["output_dir"] / "eval"),
            *shlex.split(eval_flags)]


# ---------------------------------------------------------------- one run's result

def read_metrics(output_dir: Path) -> list[dict]:
    """metrics.jsonl, the last line for each step (a resumed run repeats the steps after its
    last checkpoint)."""
    path = output_dir / "metrics.jsonl"
    by_step = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _eval_summary(results: dict) -> dict:
    """Per row of eval.py's results.json: accuracies with standard errors, perplexity and the
    embedded metrics and exposure-bias curve (per-item and per-prompt results kept for later
    paired tests)."""
    rows = {}
    for name, row in results["rows"].items():
        summary = {}
        for task in results["tasks"]:
            if task in row and "acc" in row[task]:
                summary[task] = {"acc": row[task]["acc"], "acc_stderr": row[task].get("acc_stderr"),
                                 "items": "".join(str(int(x)) for x in row[task].get("items", []))}
        if "wikitext" in row:
            summary["ppl"] = row["wikitext"].get("word_perplexity")
        summary.update(row.get("embedded", {}))
        if row.get("exposure"):
            summary["exposure"] = row["exposure"]
        rows["student" if name not in ("teacher", "ptq") else name] = summary
    return {"tasks": results["tasks"], "limit": results["limit"], "rows": rows}


def bench_average(row: dict, tasks: list[str]) -> tuple[float | None, float | None]:
    """Mean accuracy over the tasks and its standard error (independent tasks)."""
    if not tasks or not all(t in row for t in tasks):
        return None, None
    mean = sum(row[t]["acc"] for t in tasks) / len(tasks)
    errors = [row[t].get("acc_stderr") for t in tasks]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(tasks) if all(e is not None for e in errors) else None
    return mean, stderr


def final_metrics(curve: list[dict], evaluation: dict | None) -> dict:
    from report import gap_closed

    final = {}
    trained = [r for r in curve if r.get("step", 0) > 0]
    if trained:
        last = trained[-1]
        final.update(step=last["step"], train_min=last.get("train_s", 0.0) / 60,
                     tokens_generated=last.get("tokens_generated", 0), loss=last.get("loss"))
    with_kl = [r for r in curve if "heldout_kl" in r]
    if with_kl:
        final.update(heldout_kl=with_kl[-1]["heldout_kl"], heldout_kl_gap_closed=with_kl[-1]["heldout_kl_gap_closed"])
    if evaluation:
        rows = evaluation["rows"]
        teacher, ptq, student = rows.get("teacher", {}), rows.get("ptq", {}), rows.get("student", {})
        tasks = evaluation["tasks"]
        averages = {name: bench_average(rows.get(name, {}), tasks) for name in ("teacher", "ptq", "student")}
        final.update(bench_avg=averages["student"][0], bench_avg_stderr=averages["student"][1],
                     bench_gap_closed=gap_closed(averages["student"][0], averages["teacher"][0], averages["ptq"][0]),
                     ppl=student.get("ppl"), ppl_gap_closed=gap_closed(student.get("ppl"), teacher.get("ppl"),
                                                                       ptq.get("ppl")),
                     teacher_nll_of_student=student.get("teacher_nll_of_student"),
                     teacher_nll_gap_closed=gap_closed(student.get("teacher_nll_of_student"),
                                                       teacher.get("teacher_nll_of_student"),
                                                       ptq.get("teacher_nll_of_student")))
        if "heldout_kl" in student and "heldout_kl" not in final:  # no learning curve: eval.py's value
            final.update(heldout_kl=student["heldout_kl"],
                         heldout_kl_gap_closed=gap_closed(student["heldout_kl"], 0.0, ptq.get("heldout_kl")))
    return {k: v for k, v in final.items() if v is not None}


def collect_result(run: dict, launcher: str, eval_flags: str | None) -> dict:
    curve_keys = ("step", "train_s", "tokens_generated", "heldout_kl", "heldout_kl_gap_closed", "loss")
    curve = [{k: r[k] for k in curve_keys if k in r} for r in read_metrics(run["output_dir"])]
    results_file = run["output_dir"] / "eval" / "results.json"
    evaluation = _eval_summary(json.loads(results_file.read_text())) if results_file.exists() else None
    return {"name": run["name"], "values": run["values"], "config": json.loads(
                (run["output_dir"] / "run_config.json").read_text()),
            "curve": curve, "final": final_metrics(curve, evaluation), "eval": evaluation,
            "commands": {"train": shlex.join(train_command(launcher, {**run, "action": "train"})),
                         "eval": shlex.join(eval_command(run, eval_flags)) if eval_flags is not None else None}}


# ---------------------------------------------------------------- the summary

def _mean_spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _format(value: float | None, spread: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "percent":
        text, spread_text = f"{value:.1%}", None if spread is None else f"{spread:.1%}"
    elif kind == "count":
        text, spread_text = f"{value:,.0f}", None if spread is None else f"{spread:,.0f}"
    elif kind == "minutes":
        text, spread_text = f"{value:.1f}", None if spread is None else f"{spread:.1f}"
    else:
        text, spread_text = f"{value:.4f}", None if spread is None else f"{spread:.4f}"
    return text if spread_text is None else f"{text} ± {spread_text}"


def group_by_setting(results: list[dict]) -> tuple[list[str], dict[tuple, list[dict]]]:
    """The swept keys (grid order) and the runs of each setting (its values but the seed; a key
    that a run was not swept over is None)."""
    swept = list(dict.fromkeys(k for r in results for k in r["values"] if k != "seed"))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r["values"].get(k) for k in swept), []).append(r)
    return swept, groups


def student_row(result: dict) -> dict:
    """A run's own row of its evaluation (empty without one)."""
    return (result.get("eval") or {}).get("rows", {}).get("student") or {}


def bucket_means(row: dict, metric: str) -> dict[str, float]:
    """An evaluated row's exposure-bias curve (eval.py --embedded): the mean over prompts of
    ``metric`` ("kl" or "teacher_nll") in each position bucket; empty without one."""
    curve = row.get("exposure") or {}
    return {bucket: stats["mean"] for bucket, stats in curve.get(metric, {}).items() if stats["mean"] is not None}


def summarize(results: list[dict]) -> tuple[str, list[dict]]:
    """One line per setting (all values but the seed): each metric as mean ± sample standard
    deviation over its seeds; the benchmark average with its standard error where one seed.
    Where the runs have exposure-bias curves, a second table gives them the same way."""
    swept, groups = group_by_setting(results)
    columns = [("held-out KL", "heldout_kl", "plain"), ("KL gap closed", "heldout_kl_gap_closed", "percent"),
               ("teacher NLL of student", "teacher_nll_of_student", "plain"),
               ("NLL gap closed", "teacher_nll_gap_closed", "percent"), ("ppl", "ppl", "plain"),
               ("ppl gap closed", "ppl_gap_closed", "percent"), ("bench avg", "bench_avg", "plain"),
               ("bench gap closed", "bench_gap_closed", "percent"), ("train min", "train_min", "minutes"),
               ("tokens generated", "tokens_generated", "count")]
    header = [*swept, "seeds", "steps", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = []
    for key, members in groups.items():
        entry = {"values": dict(zip(swept, key)), "seeds": [m["values"].get("seed") for m in members],
                 "steps": sorted({m["final"].get("step") for m in members if m["final"].get("step") is not None})}
        cells = [str(v) for v in key] + [str(len(members)), ",".join(str(s) for s in entry["steps"]) or "–"]
        for _, metric, kind in columns:
            values = [m["final"][metric] for m in members if m["final"].get(metric) is not None]
            if not values:
                cells.append("–")
                continue
            mean, spread = _mean_spread(values)
            if metric == "bench_avg" and len(values) == 1:
                spread = members[0]["final"].get("bench_avg_stderr")
            entry[metric] = {"mean": mean, "spread": spread, "n": len(values)}
            cells.append(_format(mean, spread, kind))
        lines.append("| " + " | ".join(cells) + " |")
        table.append(entry)
    notes = ["", "Each cell: mean ± sample standard deviation over seeds (bench avg of a single seed: ± its "
                 "standard error). Gap closed: (run - ptq) / (teacher - ptq); held-out KL's teacher value is 0."]
    return "\n".join(lines + notes + exposure_table(swept, groups, table)), table


def exposure_table(swept: list[str], groups: dict[tuple, list[dict]], table: list[dict]) -> list[str]:
    """Each setting's exposure-bias curve, mean ± sd over seeds of its runs' bucket means, under
    the ptq and teacher rows of the first run evaluated with one (the same for every run: eval.py's
    cache); entries of ``table`` gain ``exposure``."""
    from report import CURVE_METRICS

    with_curve = [r for members in groups.values() for r in members if bucket_means(student_row(r), "kl")]
    if not with_curve:
        return []
    reference = with_curve[0]["eval"]["rows"]
    buckets = list(dict.fromkeys(b for r in with_curve for b in bucket_means(student_row(r), "kl")))
    curve = reference["student"]["exposure"]
    lines = ["", f"Exposure-bias curve: each model's own samples of the held-out prompts ({curve['samples_per_prompt']} "
                 f"a prompt, temperature {curve['temperature']:g}, up to {curve['max_new_tokens']} new tokens), "
                 "teacher-forced; per position bucket, the mean over prompts (ptq, teacher) or its mean ± sd over "
                 "seeds (settings).", "",
             "| setting | measure | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 2)]
    for name in ("ptq", "teacher"):
        for metric, label in CURVE_METRICS:
            means = bucket_means(reference.get(name, {}), metric)
            lines.append(f"| {name} | {label} | " + " | ".join(_format(means.get(b), None, "plain") for b in buckets)
                         + " |")
    for (key, members), entry in zip(groups.items(), table):
        setting = " ".join(f"{k}={v}" for k, v in zip(swept, key) if v is not None)
        entry["exposure"] = {}
        for metric, label in CURVE_METRICS:
            cells, entry["exposure"][metric] = [], {}
            for bucket in buckets:
                values = [m[bucket] for m in (bucket_means(student_row(r), metric) for r in members) if bucket in m]
                if not values:
                    cells.append("–")
                    continue
                mean, spread = _mean_spread(values)
                entry["exposure"][metric][bucket] = {"mean": mean, "spread": spread, "n": len(values)}
                cells.append(_format(mean, spread, "plain"))
            lines.append(f"| {setting} | {label} | " + " | ".join(cells) + " |")
    return lines


def parse_setting(text: str) -> dict[str, str]:
    """``KEY=V,KEY=V`` (a setting of the grid, the seed aside) as a dict."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise BadInput(f"--compare: {text!r} is not a setting; write KEY=VALUE[,KEY=VALUE] with the grid's values, "
                       "e.g. lmbda=0")
    return {key.replace("-", "_"): value for key, value in pairs}


def runs_of_setting(results: list[dict], setting: dict[str, str]) -> list[dict]:
    """The runs whose swept values (the seed aside) are exactly ``setting``."""
    swept, groups = group_by_setting(results)
    for key, members in groups.items():
        if {k: v for k, v in zip(swept, key) if v is not None} == setting:
            return members
    known = [",".join(f"{k}={v}" for k, v in zip(swept, key) if v is not None) for key in groups]
    raise BadInput(f"--compare: no runs of {','.join(f'{k}={v}' for k, v in setting.items())}; "
                   f"the settings here are {'; '.join(known)}")


def compare_settings(results: list[dict], a: str, b: str) -> list[str]:
    """B - A over seeds (report.welch_comparison): the final metrics (gap closed in points)
    and each bucket of the exposure-bias curve."""
    from report import CURVE_METRICS, verdict, welch_comparison

    runs_a, runs_b = runs_of_setting(results, parse_setting(a)), runs_of_setting(results, parse_setting(b))
    lines = [f"{b} vs {a}, over seeds ({len(runs_a)} and {len(runs_b)} runs; Welch's 95% CI and p):"]
    for metric, unit, scale, lower_is_better, digits in (
            ("heldout_kl", "nats", 1.0, True, 4), ("heldout_kl_gap_closed", "points", 100.0, False, 1),
            ("teacher_nll_of_student", "nats", 1.0, True, 4), ("teacher_nll_gap_closed", "points", 100.0, False, 1),
            ("train_min", "min", 1.0, True, 1)):
        values_a = [r["final"][metric] for r in runs_a if r["final"].get(metric) is not None]
        values_b = [r["final"][metric] for r in runs_b if r["final"].get(metric) is not None]
        if len(values_a) >= 2 and len(values_b) >= 2:
            stats = welch_comparison(values_a, values_b, scale)
            lines.append(f"- {metric}: {verdict(a, b, stats, unit=unit, digits=digits, lower_is_better=lower_is_better)}")
    for metric, label in CURVE_METRICS:
        curves_a = [bucket_means(student_row(r), metric) for r in runs_a]
        curves_b = [bucket_means(student_row(r), metric) for r in runs_b]
        for bucket in dict.fromkeys(bk for c in curves_a + curves_b for bk in c):
            values_a, values_b = [c[bucket] for c in curves_a if bucket in c], [c[bucket] for c in curves_b if bucket in c]
            if len(values_a) >= 2 and len(values_b) >= 2:
                stats = welch_comparison(values_a, values_b)
                lines.append(f"- exposure {label} {bucket}: "
                             f"{verdict(a, b, stats, unit='nats', digits=4, lower_is_better=True)}")
    return lines


def plot_summary(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # swept values are drawn as categories on purpose (one column each): no log line per point
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)

    written = []
    for x_key, label, name in (("step", "optimizer step", "curves_step.png"),
                               ("train_s", "training time (min)", "curves_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            points = [(p[x_key] / (60 if x_key == "train_s" else 1), p["heldout_kl"]) for p in r["curve"]
                      if "heldout_kl" in p and x_key in p]
            if points:
                ax.plot(*zip(*points), marker=".", label=r["name"], linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out KL(teacher || student) per token")
        ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    if any(bucket_means(student_row(r), "kl") for r in results):
        written.append(plot_exposure(results, out / "exposure.png"))
    swept = sorted({k for r in results for k, v in r["values"].items()
                    if len({str(x["values"].get(k)) for x in results}) > 1})
    for key in swept:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in results:
            if "heldout_kl_gap_closed" in r["final"]:
                ax.scatter([str(r["values"].get(key))], [r["final"]["heldout_kl_gap_closed"]], s=14)
        ax.set_xlabel(key)
        ax.set_ylabel("held-out KL gap closed")
        fig.tight_layout()
        fig.savefig(out / f"final_vs_{key}.png", dpi=120)
        plt.close(fig)
        written.append(out / f"final_vs_{key}.png")
    return written


def plot_exposure(results: list[dict], path: Path) -> Path:
    """The exposure-bias curves: per setting the mean over seeds (bars: their sd) of each
    bucket's KL and teacher NLL, with the ptq and teacher rows for reference."""
    import matplotlib.pyplot as plt

    from report import CURVE_METRICS

    swept, groups = group_by_setting(results)
    reference = next(r for r in results if bucket_means(student_row(r), "kl"))["eval"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, label) in zip(axes, CURVE_METRICS):
        for name in ("ptq", "teacher"):
            means = bucket_means(reference.get(name, {}), metric)
            if means:
                ax.plot(list(means), list(means.values()), linestyle="--", color="grey" if name == "ptq" else "black",
                        label=name)
        for key, members in groups.items():
            curves = [bucket_means(student_row(r), metric) for r in members]
            buckets = list(dict.fromkeys(b for c in curves for b in c))
            if not buckets:
                continue
            stats = [_mean_spread([c[b] for c in curves if b in c]) for b in buckets]
            ax.errorbar(buckets, [m for m, _ in stats], yerr=[sd or 0.0 for _, sd in stats], marker="o", capsize=3,
                        label=" ".join(f"{k}={v}" for k, v in zip(swept, key) if v is not None))
        ax.set_xlabel("position in the sampled continuation (tokens)")
        ax.set_ylabel(f"{label} per token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_results(results_dir: Path) -> list[dict]:
    if not results_dir.is_dir():
        raise BadInput(f"results directory {results_dir} does not exist")
    # other JSON files may share the directory (a calibration, say): a run's result has these keys
    results = [r for r in (json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))
                           if p.name != "summary.json") if isinstance(r, dict) and {"name", "values", "final"} <= set(r)]
    if not results:
        raise BadInput(f"no run results (*.json) in {results_dir}")
    return results


def write_summary(results_dir: Path) -> str:
    results = load_results(results_dir)
    text, table = summarize(results)
    (results_dir / "summary.md").write_text(text + "\n")
    (results_dir / "summary.json").write_text(json.dumps(table, indent=1))
    plot_summary(results, results_dir)
    return text


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="train.py flags and their values")
    p.add_argument("--seeds", type=int, default=1, help="seeds per setting: the base --seed and the next ones")
    p.add_argument("--root", default="dump/sweep", help="where the run directories go")
    p.add_argument("--results", help="where each run's result JSON and the summary go (default: ROOT/results)")
    p.add_argument("--launcher", default="accelerate launch", help="the command before train.py")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--eval", dest="eval_flags", nargs="?", const="", default=None, metavar="FLAGS",
                   help="evaluate each finished run with eval.py and these flags (one quoted string)")
    p.add_argument("--summarize", metavar="RESULTS", help="only rebuild the summary from a results directory")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="with --summarize: setting B against setting A over their seeds (each KEY=V[,KEY=V])")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        if args.compare and not args.summarize:
            raise BadInput("--compare compares the runs of a results directory: give it with --summarize RESULTS")
        if args.summarize:
            comparison = compare_settings(load_results(Path(args.summarize)), *args.compare) if args.compare else []
            print("\n".join([write_summary(Path(args.summarize)), *([""] + comparison if comparison else [])]))
            return 0
        return sweep(args, train_flags)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep(args, train_flags: list[str]) -> int:
    if not args.grid:
        raise BadInput("--grid needs at least one KEY=V1,V2 item")
    if args.seeds < 1:
        raise BadInput(f"--seeds must be >= 1, got {args.seeds}")
    if args.eval_flags is not None:
        import eval as evaluation

        try:
            evaluation.parse_args(["RUN", *shlex.split(args.eval_flags)])
        except (BadInput, ValueError, FileNotFoundError) as e:  # ValueError: shlex, an unclosed quote
            raise BadInput(f"--eval flags {args.eval_flags!r}: {e}") from None
    root = Path(args.root)
    results_dir = Path(args.results) if args.results else root / "results"
    runs = plan_runs(parse_grid(args.grid), args.seeds, train_flags, root, results_dir)
    if args.dry_run:  # what is left to run
        for run in runs:
            if run["action"] in ("done", "recorded"):
                continue
            command = shlex.join(train_command(args.launcher, run))
            if args.eval_flags is not None:
                command += " && " + shlex.join(eval_command(run, args.eval_flags))
            print(command)
        return 0
    log.info("%d runs: %d to train, %d to resume, %d done, %d recorded in %s", len(runs), *(
        sum(r["action"] == a for r in runs) for a in ("train", "resume", "done", "recorded")), results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs, 1):
        if run["action"] == "recorded":  # its result file is all there is here: keep it
            continue
        if run["action"] != "done":
            log.info("[%d/%d] %s %s", i, len(runs), run["action"], run["name"])
            code = run_to_the_end(train_command(args.launcher, run))
            if code != 0:
                print(f"error: run {run['name']} exited with {code}; rerun the same sweep command to resume it",
                      file=sys.stderr)
                return code
        if args.eval_flags is not None and _needs_eval(run["output_dir"], args.eval_flags):
            log.info("[%d/%d] eval %s", i, len(runs), run["name"])
            code = run_to_the_end([sys.executable, *eval_command(run, args.eval_flags)[1:]])
            if code != 0:
                print(f"error: eval.py on {run['name']} exited with {code}", file=sys.stderr)
                return code
            (run["output_dir"] / "eval" / EVAL_FLAGS_FILE).write_text(json.dumps(args.eval_flags))
        result = collect_result(run, args.launcher, args.eval_flags)
        result_file = results_dir / f"{run['name']}.json"
        if result["eval"] is not None and result["commands"]["eval"] is None and result_file.exists():
            # evaluated by an earlier sweep command: keep the command that made the evaluation kept
            result["commands"]["eval"] = json.loads(result_file.read_text())["commands"].get("eval")
        result_file.write_text(json.dumps(result, indent=1))
    print(write_summary(results_dir))
    return 0


EVAL_FLAGS_FILE = "sweep_eval_flags.json"  # beside eval.py's results: the --eval flags that made them


def _needs_eval(output_dir: Path, eval_flags: str) -> bool:
    """No results yet, results older than the latest checkpoint, or made with other --eval
    flags (or flags not recorded): the result file must never pair a command with numbers
    it did not make."""
    import checkpoints

    results, recorded = output_dir / "eval" / "results.json", output_dir / "eval" / EVAL_FLAGS_FILE
    latest = checkpoints.latest_checkpoint(output_dir)
    return (not results.exists() or (latest is not None and results.stat().st_mtime < latest.stat().st_mtime)
            or not recorded.exists() or json.loads(recorded.read_text()) != eval_flags)


LAUNCHER_SHUTDOWN_S = 3600  # what a run gets to finish its step and save after a signal


def run_to_the_end(command: list[str]) -> int:
    """Run a child in its own process group and wait for it, whatever signals arrive.
    SIGINT, SIGTERM and SIGHUP (a closed terminal) are passed to the whole group (a launcher
    and its workers, as a terminal's Ctrl-C would) and the child is waited for, so train.py
    finishes its step and saves; subprocess.run would kill it 0.25 s after an interrupt, or
    orphan a launcher. torch's launcher kills its workers 30 s after a signal unless
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise: a sharded save can take longer."""
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(LAUNCHER_SHUTDOWN_S), **os.environ}
    child = subprocess.Popen(command, start_new_session=True, env=env)

    def forward(signum, frame):
        log.warning("signal %d: passed to %s, waiting for it to stop", signum, Path(command[0]).name)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # it has just ended
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
