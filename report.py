"""What eval.py reports: the results table, the chart, and the paired comparison of two rows.

Every metric is also given as the fraction of the ``ptq`` -> ``teacher`` gap a row closed
(``gap_closed``; sweep.py summarises runs with it too). ``--compare A B`` pairs the two
rows' per-item results: a paired bootstrap confidence interval of the difference and
McNemar's exact test on the discordant items; and, where both rows have an exposure-bias
curve (heldout.exposure_curve), its per-prompt means, bucket by bucket.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

from errors import BadInput
from harness import PERPLEXITY_TASK


def bootstrap_ci(values: list[float], seed: int = 0, resamples: int = 10_000) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean of ``values`` (resampled with replacement)."""
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_comparison(a: list[float], b: list[float], seed: int = 0, resamples: int = 10_000,
                      scale: float = 100.0) -> dict:
    """B - A on the same items: mean difference times ``scale`` (100: points of accuracy), a
    paired bootstrap 95% CI, and McNemar's exact two-sided p-value on the discordant pairs (on
    continuous values: the sign test)."""
    if len(a) != len(b) or not a:
        raise BadInput(f"cannot pair {len(a)} items with {len(b)}: evaluate both with the same tasks and --limit")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    low, high = bootstrap_ci(diffs, seed, resamples)
    b_only, a_only = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    discordant = a_only + b_only
    tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1)) / 2**discordant if discordant else 1.0
    return {"diff": scale * sum(diffs) / n, "ci_low": scale * low, "ci_high": scale * high,
            "p_value": min(1.0, 2 * tail), "n": n, "a_only": a_only, "b_only": b_only}


def welch_comparison(a: list[float], b: list[float], scale: float = 1.0) -> dict:
    """B - A between two independent groups (the seeds of two settings): the difference of the
    means times ``scale``, Welch's 95% CI (Welch-Satterthwaite degrees of freedom: the groups'
    variances need not be equal) and its two-sided p-value."""
    from scipy.stats import t as student_t

    if len(a) < 2 or len(b) < 2:
        raise BadInput(f"a comparison over seeds needs at least 2 runs of each setting, not {len(a)} and {len(b)}: "
                       "run more seeds (sweep.py --seeds)")
    diff = statistics.fmean(b) - statistics.fmean(a)
    share_a, share_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(share_a + share_b)
    if se == 0.0:  # identical runs within each group: the difference is exact
        low = high = diff
        p_value = 1.0 if diff == 0.0 else 0.0
    else:
        df = (share_a + share_b) ** 2 / (share_a**2 / (len(a) - 1) + share_b**2 / (len(b) - 1))
        half = student_t.ppf(0.975, df) * se
        low, high = diff - half, diff + half
        p_value = float(2 * student_t.sf(abs(diff) / se, df))
    return {"diff": scale * diff, "ci_low": scale * low, "ci_high": scale * high, "p_value": p_value,
            "n": f"{len(a)}+{len(b)}"}


def verdict(name_a: str, name_b: str, stats: dict, alpha: float = 0.05, unit: str = "points", digits: int = 2,
            lower_is_better: bool = False) -> str:
    half = (stats["ci_high"] - stats["ci_low"]) / 2
    if stats["p_value"] >= alpha:
        return (f"no significant difference ({name_b} - {name_a} = {stats['diff']:+.{digits}f} +- {half:.{digits}f} "
                f"{unit}, p = {stats['p_value']:.2g}, n = {stats['n']})")
    better, worse = (name_b, name_a) if (stats["diff"] > 0) != lower_is_better else (name_a, name_b)
    return (f"{better} better than {worse} by {abs(stats['diff']):.{digits}f} +- {half:.{digits}f} {unit}, "
            f"p = {stats['p_value']:.2g}")


def average(row: dict, tasks: list[str]) -> float | None:
    values = [row[t]["acc"] for t in tasks if t in row and "acc" in row[t]]
    return sum(values) / len(values) if len(values) == len(tasks) and values else None


def gap_closed(value, teacher, ptq) -> float | None:
    """(value - ptq) / (teacher - ptq): 0 at round-to-nearest, 1 at the teacher, whichever
    direction the metric improves in; None where a value is missing or there is no gap."""
    if value is None or teacher is None or ptq is None or teacher == ptq:
        return None
    return (value - ptq) / (teacher - ptq)


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction:.0%}"


def render_table(rows: dict[str, dict], tasks: list[str]) -> str:
    """One line per row: accuracies with standard errors, their average, perplexity and the
    embedded metrics, each followed by the fraction of the ptq -> teacher gap it closed."""
    def cell(result, metric="acc"):
        if not result or metric not in result:
            return "–"
        stderr = result.get(f"{metric}_stderr")
        return f"{result[metric]:.3f} ± {stderr:.3f}" if stderr is not None else f"{result[metric]:.3f}"

    def ppl(row):
        return row.get(PERPLEXITY_TASK, {}).get("word_perplexity")

    teacher, ptq = rows.get("teacher", {}), rows.get("ptq", {})
    extra = sorted({k for row in rows.values() for k in row.get("embedded", {})})
    header = ["model", *tasks, "avg", "gap closed", "ppl", "ppl gap closed"]
    header += [h for k in extra for h in (k, f"{k} gap closed")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        avg = average(row, tasks)
        cells = [name, *(cell(row.get(t)) for t in tasks), "–" if avg is None else f"{avg:.3f}",
                 _percent(gap_closed(avg, average(teacher, tasks), average(ptq, tasks))),
                 "–" if ppl(row) is None else f"{ppl(row):.2f}", _percent(gap_closed(ppl(row), ppl(teacher), ppl(ptq)))]
        for k in extra:
            value = row.get("embedded", {}).get(k)
            cells += ["–" if value is None else f"{value:.4f}",
                      _percent(gap_closed(value, teacher.get("embedded", {}).get(k), ptq.get("embedded", {}).get(k)))]
        lines.append("| " + " | ".join(cells) + " |")
    norm = [t for t in tasks if any("acc_norm" in row.get(t, {}) for row in rows.values())]
    if norm:
        lines += ["", "acc_norm: " + "; ".join(
            f"{name}: " + ", ".join(f"{t} {cell(row.get(t), 'acc_norm')}" for t in norm) for name, row in rows.items())]
    return "\n".join(lines)


CURVE_METRICS = (("kl", "KL(T‖S)"), ("teacher_nll", "teacher NLL"))


def render_curve(rows: dict[str, dict]) -> str:
    """The exposure-bias curve of each row with one (eval.py --embedded): per position bucket
    of the sampled continuations, each metric's mean over prompts [bootstrap 95% CI], then
    the tokens (and prompts) the bucket holds."""
    curves = {name: row["exposure"] for name, row in rows.items() if row.get("exposure")}
    if not curves:
        return ""
    first = next(iter(curves.values()))
    buckets = max((list(c["kl"]) for c in curves.values()), key=len)
    lines = [f"exposure-bias curve: the row's own samples of the held-out prompts ({first['samples_per_prompt']} a "
             f"prompt, temperature {first['temperature']:g}, up to {first['max_new_tokens']} new tokens), teacher-forced; "
             f"by position in the continuation, mean over prompts [bootstrap 95% CI]", "",
             "| model | measure | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 2)]

    def cell(stats):
        if not stats or stats["mean"] is None:
            return "–"
        return f"{stats['mean']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]"

    for name, curve in curves.items():
        for key, label in CURVE_METRICS:
            lines.append(f"| {name} | {label} | " + " | ".join(cell(curve[key].get(b)) for b in buckets) + " |")
        counts = [f"{curve['kl'][b]['tokens']} ({curve['kl'][b]['prompts']})" if b in curve["kl"] else "–"
                  for b in buckets]
        lines.append(f"| {name} | tokens (prompts) | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    width = 0.8 / max(len(rows), 1)
    for i, (name, row) in enumerate(rows.items()):
        values = [row.get(t, {}).get("acc", 0.0) for t in tasks]
        errors = [row.get(t, {}).get("acc_stderr") or 0.0 for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("acc")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def find_row(rows, name: str) -> str:
    """The row (of the names in ``rows``) that a --compare name means."""
    if name in rows:
        return name
    matches = [r for r in rows if r.startswith(Path(name).name) or Path(name).name in r]
    if len(matches) != 1:
        raise BadInput(f"--compare: no single row named {name!r}; rows are {', '.join(rows)}")
    return matches[0]


def compare_rows(rows: dict, tasks: list[str], a: str, b: str) -> list[str]:
    a, b = find_row(rows, a), find_row(rows, b)
    lines = [f"paired comparison, {b} vs {a} (bootstrap 95% CI, McNemar exact p):"]
    for task in tasks:
        items_a, items_b = rows[a].get(task, {}).get("items"), rows[b].get(task, {}).get("items")
        if not items_a or not items_b:
            lines.append(f"- {task}: no per-item results to pair")
            continue
        lines.append(f"- {task}: {verdict(a, b, paired_comparison(items_a, items_b))}")
    curve_a, curve_b = rows[a].get("exposure"), rows[b].get("exposure")
    if curve_a and curve_b:
        lines.append(f"exposure-bias curve, {b} vs {a}, paired by prompt (bootstrap 95% CI, sign test p):")
        for key, label in CURVE_METRICS:
            for bucket in [b_ for b_ in curve_a[key] if b_ in curve_b[key]]:
                pairs = [(x, y) for x, y in zip(curve_a[key][bucket]["per_prompt"], curve_b[key][bucket]["per_prompt"])
                         if x is not None and y is not None]
                if not pairs:
                    lines.append(f"- {label} {bucket}: no prompt reaches it in both rows")
                    continue
                stats = paired_comparison([x for x, _ in pairs], [y for _, y in pairs], scale=1.0)
                lines.append(f"- {label} {bucket}: {verdict(a, b, stats, unit='nats', digits=4, lower_is_better=True)}")
    return lines
