"""A report folder for evaluated runs: a one-page headline, the full tables and PNG plots (matplotlib, Agg).

``write_report(comparison, out_dir)`` writes
- ``report.md``, opening with the headline: what ran, each run's verdict against the baseline
  (``evaluation.verdict``: hallucination and coverage side by side, side effects named) and the headline
  table; then one row per metric with, per run, ``value [ci_low, ci_high]`` and, per non-baseline run, the
  paired difference to the baseline with its interval and p-value;
- ``comparison.json``: the same numbers and the verdicts, machine-readable;
- ``tradeoff.png``: hallucination against coverage per run: POPE "yes" to absent vs present objects, and
  CHAIR_i@m against recall@m over the first m = 1..4 mentions of each caption;
- ``pope.png``: accuracy, F1 and yes-ratio per POPE split, one bar per run with its bootstrap interval;
- ``hallucination.png``: CHAIR_i, CHAIR_s, recall and the lab's co-occurrence rates, same layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.evaluation.chair import TRUNCATE_AT
from mmalign.evaluation.stats import MetricValue, PairedResult
from mmalign.evaluation.suite import Comparison, compare
from mmalign.evaluation.verdict import Verdict, verdict

POPE_PLOT_METRICS = ("accuracy", "f1", "yes_ratio")
HALLUCINATION_KEYS = (
    "chair/chair_i", "chair/chair_s", "chair/recall", "cooccur/partner_rate", "cooccur/partner_rate_given_trigger",
    "pope_bias/yes_rate_partner", "pope_bias/yes_rate_random",
)


def _fmt(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _cell(v: MetricValue | None) -> str:
    if v is None:
        return "-"
    return f"{_fmt(v.value)} [{_fmt(v.ci_low)}, {_fmt(v.ci_high)}] (n={v.n})"


# Columns of the headline table: hallucination, coverage, answer bias and length, the planted bias.
HEADLINE = {
    "pope/all/fp_rate": "POPE FP rate", "pope/all/tp_rate": "POPE TP rate", "pope/all/yes_ratio": "yes-ratio",
    "chair/hallucinated_per_caption": "halluc./caption", "chair/correct_per_caption": "correct/caption",
    "chair/chair_i": "CHAIR_i", "chair/recall": "recall", "chair/words_per_caption": "words",
    "pope_bias/yes_rate_partner": "'yes' absent partner", "cooccur/partner_rate": "partner named",
}


def _p(p: float, n_boot: int) -> str:
    """The p-value; at the bootstrap's floor, 1/(n_boot+1), the bound ``< 1/n_boot``."""
    if math.isnan(p):
        return "n/a"
    return f"< {1 / n_boot:.3g}" if p <= 1 / (n_boot + 1) else f"{p:.3g}"


def markdown_table(comparison: Comparison) -> str:
    """The metrics table: runs side by side, then ``Δ run - baseline [CI]`` and ``p`` per other run."""
    base = comparison.names[0]
    others = comparison.names[1:]
    keys = list(comparison.values[base]) + sorted(
        {k for name in others for k in comparison.values[name]} - set(comparison.values[base]))
    header = ["metric", *comparison.names]
    for name in others:
        header += [f"Δ {name} − {base}", "p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        row = [key] + [_cell(comparison.values[name].get(key)) for name in comparison.names]
        for name in others:
            test = comparison.tests[name].get(key)
            row += ["-", "-"] if test is None else [
                f"{_fmt(test.diff, signed=True)} [{_fmt(test.ci_low, True)}, {_fmt(test.ci_high, True)}]",
                _p(test.p_value, comparison.n_boot)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _headline_cell(value: MetricValue | None, test: PairedResult | None) -> str:
    if value is None:
        return "-"
    if test is None:
        return _fmt(value.value)
    mark = "*" if test.ci_low > 0 or test.ci_high < 0 else ""
    return f"{_fmt(value.value)} ({_fmt(test.diff, True)}{mark})"


def headline_table(comparison: Comparison, verdicts: dict[str, Verdict]) -> str:
    """Runs as rows: the verdict, then hallucination, coverage, answer bias and length side by side; each
    cell ``value (Δ vs baseline)``, ``*`` where the paired interval excludes 0."""
    base = comparison.values[comparison.names[0]]
    keys = [k for k in HEADLINE if k in base]
    lines = ["| run | verdict | " + " | ".join(HEADLINE[k] for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in comparison.names:
        tests = comparison.tests.get(name, {})
        cells = [_headline_cell(comparison.values[name].get(k), tests.get(k)) for k in keys]
        label = verdicts[name].label if name in verdicts else "baseline"
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts_of(comparison: Comparison) -> dict[str, Verdict]:
    """The verdict of every non-baseline run (``evaluation.verdict``)."""
    return {name: verdict(comparison.tests[name]) for name in comparison.names[1:]}


def headline(comparison: Comparison, runs: dict[str, str] | None = None) -> str:
    """The report's first page: what ran, the verdicts with their reasons and side effects, the table."""
    base = comparison.names[0]
    verdicts = verdicts_of(comparison)
    lines = [f"Baseline **{base}**" + (f" (`{runs[base]}`)" if runs and base in runs else "") + "."]
    for name, v in verdicts.items():
        where = f" (`{runs[name]}`)" if runs and name in runs else ""
        lines += ["", f"**{name}**{where}: **{v.label}**."]
        lines += [f"- {r}" for r in v.reasons]
        if v.side_effects:
            lines.append("- side effects: " + "; ".join(v.side_effects))
        if v.bias:
            lines.append("- planted bias: " + "; ".join(v.bias))
    lines += ["", headline_table(comparison, verdicts)]
    return "\n".join(lines)


def _bars(ax: Any, comparison: Comparison, keys: list[str], labels: list[str], title: str) -> None:
    """Grouped bars: one group per key, one bar per run, error bars = the bootstrap interval."""
    width = 0.8 / len(comparison.names)
    for r, name in enumerate(comparison.names):
        vals = [comparison.values[name].get(k) for k in keys]
        heights = [v.value if v and not math.isnan(v.value) else 0.0 for v in vals]
        lows = [h - v.ci_low if v and not math.isnan(v.ci_low) else 0.0 for h, v in zip(heights, vals)]
        highs = [v.ci_high - h if v and not math.isnan(v.ci_high) else 0.0 for h, v in zip(heights, vals)]
        xs = [i + (r - (len(comparison.names) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, heights, width, yerr=[lows, highs], capsize=3, label=name)
    ax.set_xticks(range(len(keys)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)


def _plot_pope(comparison: Comparison, path: Path) -> bool:
    import matplotlib.pyplot as plt

    base = comparison.values[comparison.names[0]]
    splits = list(dict.fromkeys(k.split("/")[1] for k in base if k.startswith("pope/")))
    if not splits:
        return False
    fig, axes = plt.subplots(1, len(POPE_PLOT_METRICS), figsize=(4 * len(POPE_PLOT_METRICS), 3.6))
    for ax, metric in zip(axes, POPE_PLOT_METRICS):
        _bars(ax, comparison, [f"pope/{s}/{metric}" for s in splits], splits, f"POPE {metric}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_hallucination(comparison: Comparison, path: Path) -> bool:
    import matplotlib.pyplot as plt

    base = comparison.values[comparison.names[0]]
    keys = [k for k in HALLUCINATION_KEYS if k in base]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.8))
    _bars(ax, comparison, keys, keys, "object hallucination (lower is better, except recall)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_tradeoff(comparison: Comparison, path: Path) -> bool:
    """Left: POPE FP rate (x) against TP rate (y) per run, with intervals. Right: CHAIR_i@m (x) against
    recall@m (y), m = 1..4, one line per run. Up and to the left is better on both."""
    import matplotlib.pyplot as plt

    base = comparison.values[comparison.names[0]]
    has_pope = "pope/all/fp_rate" in base
    has_curve = f"chair/chair_i@{TRUNCATE_AT[0]}" in base
    if not (has_pope or has_curve):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for name in comparison.names:
        vals = comparison.values[name]
        if has_pope:
            fp, tp = vals["pope/all/fp_rate"], vals["pope/all/tp_rate"]
            axes[0].errorbar(fp.value, tp.value, xerr=[[fp.value - fp.ci_low], [fp.ci_high - fp.value]],
                             yerr=[[tp.value - tp.ci_low], [tp.ci_high - tp.value]], fmt="o", capsize=3, label=name)
        if has_curve:
            xs = [vals[f"chair/chair_i@{m}"].value for m in TRUNCATE_AT]
            ys = [vals[f"chair/recall@{m}"].value for m in TRUNCATE_AT]
            axes[1].plot(xs, ys, "o-", label=name)
    axes[0].set(xlabel="POPE 'yes' to absent objects (FP rate)", ylabel="'yes' to present objects (TP rate)",
                title="POPE")
    axes[1].set(xlabel="CHAIR_i over the first m mentions", ylabel="recall over the first m mentions",
                title=f"captions, m = {TRUNCATE_AT[0]}..{TRUNCATE_AT[-1]}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(comparison: Comparison, out_dir: str | Path, runs: dict[str, str] | None = None) -> Path:
    """Write ``report.md``, ``comparison.json`` and the PNG plots into ``out_dir``; returns report.md.

    ``runs``: optional run name -> evaluation dir, listed in the report's header.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = comparison.names[0]
    lines = ["# Evaluation report", "", headline(comparison, runs)]
    if _plot_tradeoff(comparison, out / "tradeoff.png"):
        lines.append("![hallucination against coverage](tradeoff.png)\n")
    note = "Each metric: value [bootstrap interval] (n samples)."
    if len(comparison.names) > 1:
        note += f" Paired bootstrap tests resample the same samples for both runs; Δ is the run minus {base}."
    lines += ["## All metrics", "", note, "", markdown_table(comparison)]
    if _plot_pope(comparison, out / "pope.png"):
        lines.append("![POPE](pope.png)\n")
    if _plot_hallucination(comparison, out / "hallucination.png"):
        lines.append("![hallucination](hallucination.png)\n")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    data = {"names": comparison.names,
            "values": {n: {k: v.to_json() for k, v in vals.items()} for n, vals in comparison.values.items()},
            "tests": {n: {k: t.to_json() for k, t in vals.items()} for n, vals in comparison.tests.items()},
            "verdicts": {n: vars(v) for n, v in verdicts_of(comparison).items()}}
    (out / "comparison.json").write_text(json.dumps(data, indent=1) + "\n")
    return path


@dataclass
class CompareConfig:
    """``mmalign eval compare``: where the report goes and the paired bootstrap settings."""

    out_dir: str = "runs/compare"
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_boot < 1 or not 0.0 < self.level < 1.0:
            raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {self.n_boot}, {self.level}")


def run_names(run_dirs: list[str]) -> dict[str, str]:
    """Run name -> dir: each dir's folder name, or the path as given when folder names collide."""
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):
        names = list(run_dirs)
    if len(set(names)) < len(names):
        raise ValueError(f"the same evaluation dir is listed twice: {run_dirs}")
    return dict(zip(names, run_dirs))


def report_runs(run_dirs: list[str], cfg: CompareConfig) -> Path:
    """Compare evaluation dirs (the first is the baseline) and write the report folder; returns report.md."""
    runs = run_names(run_dirs)
    comparison = compare(runs, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    return write_report(comparison, cfg.out_dir, runs)
