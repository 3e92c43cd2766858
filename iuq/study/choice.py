"""The rule that chooses a reading on a dev split, as docs/evidence.md 10.5 fixed it before any dev
run had finished. Pure functions of run summaries, so the choice can be recomputed from the
committed summaries alone (`iuq ablate ... --report-only --choose`).

1. Dev score of an arm: its paired Δ late AP to the baseline (same seeds), meaned over seeds.
   The paired Δ of the final AP breaks ties within `TIE` AP.
2. A switch helps when its score is above the paper-literal arm's (`both`).
3. The helping switches, ranked by score, are combined two and three at a time (top two, top
   three); of switches that conflict (the two stop-gradients) only the better one enters.
4. The chosen reading is the arm with the highest score among `both`, the singles and the
   combinations; of arms within `TIE` of the best, the one with fewer switches, then the one with
   the higher final-AP Δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iuq.study.report import late_ap

TIE = 0.25  # AP; one evaluation swings ±1.5 AP on nuclei24 (evidence 10.4), so smaller gaps decide nothing


class ChoiceError(ValueError):
    pass


@dataclass(frozen=True)
class Score:
    arm: str
    late: float  # mean paired Δ late AP to the baseline
    final: float  # mean paired Δ final AP to the baseline
    seeds: tuple[int, ...]

    @property
    def switches(self) -> int:
        """0 for the paper-literal arm, 1 for a single switch, k for a combination of k."""
        return 0 if self.arm == "both" else len(self.arm.split("+"))


def dev_scores(summaries: list[dict], seeds: tuple[int, ...], reference: str = "baseline") -> dict[str, Score]:
    """Score of every arm other than the reference, from the seeds given (each arm needs all of them)."""
    by_arm: dict[str, dict[int, dict]] = {}
    for s in summaries:
        by_arm.setdefault(s["arm"], {})[s["seed"]] = s
    if reference not in by_arm:
        raise ChoiceError(f"no run of the reference arm {reference!r}: the rule scores arms against it")
    scores = {}
    for arm, runs in by_arm.items():
        if arm == reference:
            continue
        missing = [seed for seed in seeds if seed not in runs or seed not in by_arm[reference]]
        if missing:
            raise ChoiceError(
                f"arm {arm!r} (or {reference!r}) has no finished run for seed(s) {missing}: the rule needs "
                f"every arm on seeds {list(seeds)}; finish the study first (rerunning its command resumes it)"
            )
        ref = by_arm[reference]
        late = np.mean([late_ap(runs[k]) - late_ap(ref[k]) for k in seeds])
        final = np.mean([runs[k]["metrics"]["AP"] - ref[k]["metrics"]["AP"] for k in seeds])
        scores[arm] = Score(arm, float(late), float(final), tuple(seeds))
    return scores


def helping(scores: dict[str, Score], literal: str = "both") -> list[Score]:
    """The single switches scoring above the paper-literal arm, best first."""
    if literal not in scores:
        raise ChoiceError(f"no scored run of {literal!r}: a switch helps only by beating it")
    singles = [s for s in scores.values() if s.switches == 1 and s.late > scores[literal].late]
    return sorted(singles, key=lambda s: (-s.late, -s.final))


def _conflict(a: dict, b: dict) -> bool:
    return any(k in b and b[k] != v for k, v in a.items())


def combinations(helps: list[Score], overrides: dict[str, dict]) -> list[str]:
    """The combined arms to run next: the top two and the top three helping switches (a+b, a+b+c).
    A switch that sets a key a better one already set to another value (the two stop-gradients,
    both `iuq.equi_stopgrad`) does not enter. overrides: each arm's config overrides."""
    kept: list[str] = []
    for s in helps:
        if not any(_conflict(overrides[s.arm], overrides[k]) for k in kept):
            kept.append(s.arm)
    return ["+".join(kept[:k]) for k in (2, 3) if len(kept) >= k]


def chosen(scores: dict[str, Score], literal: str = "both") -> Score:
    """The reading among the paper-literal arm, the singles and the combinations."""
    if literal not in scores:
        raise ChoiceError(f"no scored run of {literal!r}")
    best = max(s.late for s in scores.values())
    near = [s for s in scores.values() if s.late >= best - TIE]
    return min(near, key=lambda s: (s.switches, -s.final, -s.late))


def choice_markdown(scores: dict[str, Score], overrides: dict[str, dict], literal: str = "both") -> str:
    """The rule applied: every arm's score, which switches help, what to combine, what is chosen."""
    helps = helping(scores, literal)
    combos = combinations(helps, overrides)
    pending = [c for c in combos if c not in scores]
    pick = chosen(scores, literal)
    seeds = ", ".join(str(k) for k in next(iter(scores.values())).seeds)
    lines = [
        f"# The dev rule applied (seeds {seeds})",
        "",
        "Score: paired Δ late AP to `baseline`, mean over seeds; final-AP Δ beside it (ties within "
        f"{TIE} AP). `iuq/study/choice.py` states the rule.",
        "",
        "| arm | switches | Δ late AP | Δ final AP | helps (above `" + literal + "`) |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(scores.values(), key=lambda s: -s.late):
        mark = "yes" if s in helps else "—" if s.switches != 1 else "no"
        lines.append(f"| `{s.arm}` | {s.switches} | {s.late:+.2f} | {s.final:+.2f} | {mark} |")
    lines += [""]
    if not helps:
        lines.append(f"No switch scores above `{literal}`: no combination; the reading stays `{literal}`.")
    elif not combos:
        lines.append(f"One switch helps (`{helps[0].arm}`): no combination to run.")
    else:
        lines.append("Combinations the rule runs: " + ", ".join(f"`{c}`" for c in combos) + ".")
    if pending:
        lines += [
            "",
            "Not run yet, so nothing is chosen: `iuq ablate ... --arms " + ",".join(pending) + "` on the dev config.",
        ]
    else:
        lines += ["", f"**Chosen reading: `{pick.arm}`** (Δ late AP {pick.late:+.2f}, Δ final AP {pick.final:+.2f})."]
    return "\n".join(lines) + "\n"
