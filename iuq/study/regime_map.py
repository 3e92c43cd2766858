"""The regime map: the paired AP gain of each IUQ arm over its study's reference, one row per
regime (one finished `components` study each), with 95% CIs.

    python -m iuq.study.regime_map OUT.md NAME=STUDY_DIR [NAME=STUDY_DIR ...]

writes OUT.md and OUT.png from each STUDY_DIR/results.json (its summaries, so committed studies are
enough).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from iuq.study.report import mean_ci, paired


def gains(study_dir: Path) -> tuple[str, dict[str, tuple[float, float | None, int]], dict[str, float]]:
    """Reference arm, {arm: (mean, CI, n) of the paired AP difference}, {arm: mean AP}."""
    data = json.loads((study_dir / "results.json").read_text())
    arms = [a["arm"] for a in data["arms"]]
    runs = {a: [r for r in data["runs"] if r["arm"] == a] for a in arms}
    ref = arms[0]
    aps = {a: mean_ci([r["metrics"]["AP"] for r in runs[a]])[0] for a in arms}
    return ref, {a: paired(runs[a], runs[ref], "AP") for a in arms[1:]}, aps


def _cell(mean: float, half: float | None, n: int) -> str:
    if not n:
        return "—"
    if half is None:
        return f"{mean:+.2f} (n={n})"
    mark = " ▲" if mean - half > 0 else " ▼" if mean + half < 0 else ""
    return f"{mean:+.2f} ± {half:.2f}{mark}"


def write_map(out: Path, regimes: dict[str, Path]) -> None:
    rows = {name: gains(path) for name, path in regimes.items()}
    arms = []
    for _, g, _ in rows.values():
        arms += [a for a in g if a not in arms]
    lines = [
        "| regime | reference AP | " + " | ".join(f"Δ AP `{a}`" for a in arms) + " |",
        "|---|---|" + "---|" * len(arms),
    ]
    for name, (ref, g, aps) in rows.items():
        cells = [_cell(*g[a]) if a in g else "not run" for a in arms]
        lines.append(f"| {name} | {aps[ref]:.2f} | " + " | ".join(cells) + " |")
    note = "Paired difference to the study's reference arm over common seeds, mean ± 95% CI; ▲/▼: CI above/below 0."
    out.write_text("\n".join(lines) + "\n\n" + note + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.5))
    width = 0.8 / max(len(arms), 1)
    for j, arm in enumerate(arms):
        xs, ms, es = [], [], []
        for i, (_, g, _) in enumerate(rows.values()):
            if arm in g and g[arm][2]:
                xs.append(i + (j - (len(arms) - 1) / 2) * width)
                ms.append(g[arm][0])
                es.append(g[arm][1] or 0.0)
        ax.bar(xs, ms, width, yerr=es, capsize=3, label=arm, color=f"C{j}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), list(rows), rotation=15)
    ax.set_ylabel("Δ mask AP vs baseline")
    ax.set_title("gain of each IUQ arm per regime (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    write_map(Path(argv[0]), {k: Path(v) for k, v in (a.split("=", 1) for a in argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
