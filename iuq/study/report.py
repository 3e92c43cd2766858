"""The report of a study: per arm mean and 95% CI (Student t over seeds) of every metric and of
s/step, the paired difference to the reference arm (same seeds), the paper's row beside ours, and
two figures. Pure functions of the run summaries, so a report can be rebuilt from committed
summaries alone (`iuq ablate ... --report-only`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from iuq.study.arms import CONDINST_CAPTION, paper_rows

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the two-sided Student-t interval); the half-width is None for n < 2."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return math.nan, None
    if x.size < 2:
        return float(x.mean()), None
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


LATE_EVALS = 4


def late_ap(summary: dict, evals: int = LATE_EVALS) -> float:
    """Mean of the final AP and the last `evals - 1` val evaluations during training.

    The final AP alone carries the evaluation-to-evaluation swings of a model still moving (±1.5 AP
    on nuclei24 after its plateau, docs/evidence.md 10.4); the mean over the last few evaluations
    is the steadier score for choosing a setting on a dev split. With fewer evaluations, those there are.
    When the run ends on an evaluation step, that evaluation is of the final model, already counted
    as the final AP: it is left out (it is logged at step `steps - 1`, summary["steps"] the final step).
    """
    curve = summary.get("val_curve") or []
    if summary.get("steps") is not None:
        curve = [(step, ap) for step, ap in curve if step < summary["steps"] - 1]
    during = [ap for _, ap in curve][-(evals - 1) :] if evals > 1 else []
    return float(np.mean([*during, summary["metrics"]["AP"]]))


def _score(summary: dict, key: str) -> float:
    return late_ap(summary) if key == "late_AP" else summary["metrics"][key]


def paired(arm: list[dict], reference: list[dict], key: str) -> tuple[float, float | None, int]:
    """Mean and CI of arm - reference over the seeds both have; n pairs. key: a metric or "late_AP"."""
    ref = {s["seed"]: s for s in reference}
    diffs = [_score(s, key) - _score(ref[s["seed"]], key) for s in arm if s["seed"] in ref]
    mean, half = mean_ci(diffs)
    return mean, half, len(diffs)


def _fmt(mean: float, half: float | None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if half is not None else f"{mean:.{digits}f}"


def arm_rows(arms: list, summaries: list[dict], paper: dict[str, dict | None] | None = None) -> list[dict]:
    """One row per arm; `paper`: the paper's row per arm name (default: each arm's own, CondInst's)."""
    by_arm = {a.name: [s for s in summaries if s["arm"] == a.name] for a in arms}
    reference = arms[0].name
    rows = []
    for arm in arms:
        runs = by_arm[arm.name]
        row = {"arm": arm.name, "n": len(runs), "seeds": [s["seed"] for s in runs], "overrides": arm.overrides}
        for key in METRICS:
            row[key] = mean_ci([s["metrics"][key] for s in runs])
        row["late_AP"] = mean_ci([late_ap(s) for s in runs])
        row["s_per_step"] = mean_ci([s.get("s_per_step") for s in runs])
        if arm.name != reference:
            row["paired"] = {k: paired(runs, by_arm[reference], k) for k in (*METRICS, "late_AP")}
        row["paper"] = arm.paper if paper is None else paper.get(arm.name)
        rows.append(row)
    return rows


def markdown(study: str, rows: list[dict], paper_caption: str = CONDINST_CAPTION) -> str:
    ref = rows[0]["arm"]
    paper_ref = rows[0]["paper"]
    lines = [
        f"# Study `{study}`",
        "",
        f"Mean ± 95% CI (Student t over seeds); Δ is the paired difference to `{ref}` on the same seeds. "
        f"Late AP: the mean of the final AP and the last {LATE_EVALS - 1} evaluations during training. {paper_caption}",
        "",
        "| arm | n | AP | AP50 | AP75 | APs | APm | APl | late AP | s/step | ΔAP vs " + ref + " | "
        "Δ late AP | paper AP (Δ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"`{r['arm']}`", str(r["n"]), *(_fmt(*r[k]) for k in (*METRICS, "late_AP"))]
        cells.append(_fmt(*r["s_per_step"], digits=3))
        for key in ("AP", "late_AP"):
            if "paired" not in r:
                cells.append("reference")
                continue
            d, h, n = r["paired"][key]
            sign = ""
            if h is not None:
                sign = " (above 0)" if d - h > 0 else " (below 0)" if d + h < 0 else ""
            cells.append(f"{_fmt(d, h)}{sign}" if n else "n/a")
        p = r["paper"]
        if p and p.get("AP") is not None:
            gain = f" ({p['AP'] - paper_ref['AP']:+.1f})" if paper_ref and paper_ref.get("AP") is not None else ""
            cells.append(f"{p['AP']:.1f}{gain}")
        else:
            cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Overrides of each arm (on top of the config and the command's --set):", ""]
    for r in rows:
        pairs = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        lines.append(f"- `{r['arm']}`: {pairs}")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "n", "metric", "mean", "ci95", "paired_diff", "paired_ci95", "paper"])
        for r in rows:
            for key in (*METRICS, "late_AP", "s_per_step"):
                mean, half = r[key]
                d = r.get("paired", {}).get(key, (None, None, 0))
                paper = (r["paper"] or {}).get(key)
                w.writerow([r["arm"], r["n"], key, mean, half, d[0], d[1], paper])


def common_grid(curves: list[list[list[float]]], every: int = 40):
    """Seeds' val curves ([[step, AP], ...], evaluated at steps that differ when a run was resumed)
    on one grid: every `every` steps over the range all of them cover, plus their last common step,
    each curve linearly interpolated between its own evaluations. -> (grid [G], table [seeds, G]),
    or (None, None) when they share no range."""
    if not curves:
        return None, None
    lo = max(c[0][0] for c in curves)
    hi = min(c[-1][0] for c in curves)
    if hi < lo:
        return None, None
    grid = np.unique(np.append(np.arange(np.ceil(lo / every) * every, hi + 1, every), [lo, hi]))
    table = np.array([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return grid, table


def report_prefix(study: str) -> str:
    """File-name prefix of a study's report: studies sharing one folder (their baselines have the same
    fingerprint, so they may) must not overwrite each other's report. `components` keeps the bare names."""
    return "" if study == "components" else f"{study}_"


def plot(rows: list[dict], summaries: list[dict], out: Path, study: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["arm"] for r in rows]
    means = [r["AP"][0] for r in rows]
    errs = [r["AP"][1] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 3.5))
    ax.bar(names, means, yerr=errs, capsize=4, color=["0.6", *["C0"] * (len(rows) - 1)])
    for i, s in enumerate(rows):  # every seed as a dot
        seeds = [x["metrics"]["AP"] for x in summaries if x["arm"] == s["arm"]]
        ax.plot([i] * len(seeds), seeds, "k.", ms=4)
    ax.set_ylabel("mask AP (val)")
    ax.set_title(f"{study}: mean ± 95% CI, dots = seeds")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / f"{report_prefix(study)}results.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, r in enumerate(rows):
        curves = [s["val_curve"] for s in summaries if s["arm"] == r["arm"] and s.get("val_curve")]
        grid, table = common_grid(curves)
        if table is None:
            continue
        mean = table.mean(0)
        ax.plot(grid, mean, label=f"{r['arm']} (n={table.shape[0]})", color=f"C{i}")
        if table.shape[0] > 1:
            half = stats.t.ppf(0.975, table.shape[0] - 1) * table.std(0, ddof=1) / np.sqrt(table.shape[0])
            ax.fill_between(grid, mean - half, mean + half, alpha=0.15, color=f"C{i}")
    ax.set_xlabel("step")
    ax.set_ylabel("val AP")
    ax.set_title(f"{study}: mean over seeds, band = 95% CI (t)", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no evaluation during training", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / f"{report_prefix(study)}curves.png", dpi=120)
    plt.close(fig)


def write_report(out: Path, study: str, arms: list, summaries: list[dict], model: str | None = None) -> dict:
    """model: the studied base model's type, which decides the paper rows shown (arms.paper_rows)."""
    out.mkdir(parents=True, exist_ok=True)
    caption, paper = paper_rows(study, arms, model)
    rows = arm_rows(arms, summaries, paper)
    stem = out / f"{report_prefix(study)}results"
    stem.with_suffix(".md").write_text(markdown(study, rows, caption))
    write_csv(rows, stem.with_suffix(".csv"))
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"study": study, "arms": rows, "runs": summaries}, f, indent=1)
    plot(rows, summaries, out, study)
    return {"study": study, "arms": rows}
