"""The dev rule of iuq/study/choice.py on constructed summaries whose scores are worked out by hand."""

import json

import pytest

from iuq.cli import main
from iuq.study.arms import study_arms
from iuq.study.choice import ChoiceError, chosen, combinations, dev_scores, helping

OVERRIDES = {a.name: a.overrides for a in study_arms("readings")}


def run(arm: str, seed: int, final: float, curve: tuple[float, ...] = ()) -> dict:
    metrics = {"AP": final, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": -1.0}
    return {"arm": arm, "seed": seed, "metrics": metrics, "val_curve": [[64 * (i + 1), v] for i, v in enumerate(curve)]}


def study(late_deltas: dict[str, tuple[float, float]]) -> list[dict]:
    """Baseline at late AP 20 on seeds 0 and 1 (flat curves), and each arm offset by its two seeds' deltas."""
    runs = [run("baseline", k, 20.0, (20.0, 20.0, 20.0)) for k in (0, 1)]
    for arm, deltas in late_deltas.items():
        runs += [run(arm, k, 20.0 + d, (20.0 + d,) * 3) for k, d in enumerate(deltas)]
    return runs


def test_score_is_the_mean_paired_late_and_final_delta():
    runs = [
        run("baseline", 0, 20.0, (10.0, 18.0, 22.0, 16.0)),  # late (18 + 22 + 16 + 20) / 4 = 19
        run("baseline", 1, 21.0, (21.0, 21.0, 21.0)),  # late 21
        run("both", 0, 15.0, (30.0, 17.0, 13.0, 15.0)),  # late (17 + 13 + 15 + 15) / 4 = 15: Δ -4
        run("both", 1, 19.0, (17.0, 17.0, 19.0)),  # late 18: Δ -3
    ]
    s = dev_scores(runs, (0, 1))["both"]
    assert s.late == pytest.approx(-3.5)
    assert s.final == pytest.approx(((15.0 - 20.0) + (19.0 - 21.0)) / 2)
    assert s.switches == 0


def test_helping_switches_beat_both_and_combine_without_conflicts():
    scores = dev_scores(
        study(
            {
                "both": (-4.0, -4.0),
                "stopgrad_queries": (-1.0, -1.0),  # best
                "stopgrad_features": (-2.0, -1.0),  # helps, but sets equi_stopgrad as the better one does
                "warmup_300": (-3.0, -2.0),
                "inter_center": (-3.0, -3.5),
                "equi_unit": (-5.0, -4.0),  # below both
            }
        ),
        (0, 1),
    )
    assert [s.arm for s in helping(scores)] == [
        "stopgrad_queries", "stopgrad_features", "warmup_300", "inter_center"
    ]  # fmt: skip
    assert combinations(helping(scores), OVERRIDES) == [
        "stopgrad_queries+warmup_300",
        "stopgrad_queries+warmup_300+inter_center",
    ]


def test_one_or_no_helping_switch_gives_no_combination():
    one = dev_scores(study({"both": (-4.0, -4.0), "warmup_300": (-1.0, -1.0), "equi_unit": (-5.0, -5.0)}), (0, 1))
    assert combinations(helping(one), OVERRIDES) == []
    none = dev_scores(study({"both": (-1.0, -1.0), "warmup_300": (-1.0, -1.0)}), (0, 1))  # equal is not above
    assert helping(none) == []
    assert chosen(none).arm == "both"  # a tie within 0.25 goes to fewer switches


def test_within_the_tie_fewer_switches_win_then_the_final_delta():
    runs = study({"both": (-3.0, -3.0), "warmup_300": (0.0, 0.0), "warmup_300+inter_center": (0.2, 0.2)})
    assert chosen(dev_scores(runs, (0, 1))).arm == "warmup_300"  # 0.2 above it: inside the 0.25 tie
    runs = study({"both": (-3.0, -3.0), "warmup_300": (0.0, 0.0), "warmup_300+inter_center": (0.3, 0.3)})
    assert chosen(dev_scores(runs, (0, 1))).arm == "warmup_300+inter_center"
    # Two singles tied on late AP: the higher final-AP Δ decides.
    runs = study({"both": (-3.0, -3.0), "warmup_300": (0.0, 0.0), "equi_unit": (0.1, 0.1)})
    for r in runs:
        if r["arm"] == "warmup_300":
            r["metrics"]["AP"] += 1.0  # final Δ +1, late Δ +0.25: still within the tie of equi_unit's +0.1
    assert chosen(dev_scores(runs, (0, 1))).arm == "warmup_300"


def test_a_missing_seed_is_refused():
    runs = study({"both": (-3.0, -3.0)})[:-1]  # both's seed 1 missing
    with pytest.raises(ChoiceError, match=r"seed\(s\) \[1\]"):
        dev_scores(runs, (0, 1))


def test_cli_choose_writes_choice_md_and_refuses_unfinished_arms(tmp_path, capsys):
    runs = study({"both": (-4.0, -4.0), "warmup_300": (-1.0, -2.0), "equi_unit": (-5.0, -4.0)})
    for r in runs:
        folder = tmp_path / "summaries" / r["arm"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"seed{r['seed']}.json").write_text(json.dumps(r))
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  synthetic: {images: 4, size: 64}\n")
    base = ["ablate", str(config), "--study", "readings", "--seeds", "2", "--out", str(tmp_path), "--report-only"]
    assert main([*base, "--arms", "both,warmup_300,equi_unit", "--choose"]) == 0
    text = (tmp_path / "choice.md").read_text()
    assert "| `warmup_300` | 1 | -1.50 | -1.50 | yes |" in text
    assert "One switch helps (`warmup_300`)" in text and "**Chosen reading: `warmup_300`**" in text
    assert main([*base, "--arms", "both,warmup_300,inter_center", "--choose"]) == 2
    assert "no finished run of arm(s) ['inter_center']" in capsys.readouterr().err
    assert main([*base, "--arms", "both", "--seeds", "3", "--choose"]) == 2  # seed 2 was never run
    assert main([str(a) for a in ["ablate", config, "--study", "readings", "--out", tmp_path, "--choose"]]) == 2
