"""`iuq ablate`: the statistics of the report by hand, and a small study end to end (resume, refusal
to mix settings, every output written)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from iuq.cli import main
from iuq.study.arms import STUDIES, study_arms
from iuq.study.report import late_ap, mean_ci, paired
from tests.engine.test_train import tiny_data, tiny_overrides  # noqa: F401 (fixture)


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci([5.0]) == (5.0, None)


def test_paired_difference_uses_the_common_seeds():
    ref = [{"seed": s, "metrics": {"AP": v}} for s, v in [(0, 10.0), (1, 12.0), (2, 11.0)]]
    arm = [{"seed": s, "metrics": {"AP": v}} for s, v in [(0, 11.0), (1, 14.0), (3, 50.0)]]
    mean, half, n = paired(arm, ref, "AP")
    assert n == 2 and mean == 1.5  # differences 1 and 2; seed 3 has no partner
    assert half == pytest.approx(12.706204736174698 * math.sqrt(0.5) / math.sqrt(2))


def test_late_ap_is_the_mean_of_the_final_and_the_last_three_evaluations():
    run = {"seed": 0, "metrics": {"AP": 20.0}, "val_curve": [[80, 1.0], [160, 10.0], [240, 14.0], [320, 18.0]]}
    assert late_ap(run) == (10.0 + 14.0 + 18.0 + 20.0) / 4
    assert late_ap({**run, "val_curve": [[80, 16.0]]}) == 18.0  # fewer evaluations: those there are
    assert late_ap({**run, "val_curve": []}) == 20.0
    ref = {"seed": 0, "metrics": {"AP": 21.0}, "val_curve": [[80, 0.0], [160, 11.0], [240, 11.0], [320, 11.0]]}
    mean, half, n = paired([run], [ref], "late_AP")
    assert (mean, half, n) == (15.5 - 13.5, None, 1)


def test_late_ap_counts_the_final_model_once_when_the_run_ends_on_an_evaluation():
    # 320 steps, val every 80: the evaluation logged at step 319 is of the final model (AP 20 = metrics AP)
    run = {"seed": 0, "metrics": {"AP": 20.0}, "steps": 320,
           "val_curve": [[79, 1.0], [159, 10.0], [239, 14.0], [319, 20.0]]}  # fmt: skip
    assert late_ap(run) == (1.0 + 10.0 + 14.0 + 20.0) / 4
    assert late_ap({**run, "steps": 330}) == (10.0 + 14.0 + 20.0 + 20.0) / 4  # 319 is not the final step


def test_every_study_has_its_reference_first_and_the_fair_augmentation():
    assert set(STUDIES) == {
        "components", "inter_loss", "sampling", "capacity", "equivariance", "lambda", "readings", "collapse"
    }  # fmt: skip
    for name, arms in STUDIES.items():
        assert arms[0].overrides.get("iuq.inter") is False and arms[0].overrides.get("iuq.equi") is False, name
        assert len({a.name for a in arms}) == len(arms)
    assert [a.name for a in study_arms("components")] == ["baseline", "inter", "equi", "both"]
    assert [a.name for a in study_arms("components", ["both"])] == ["baseline", "both"]
    assert all(a.overrides["iuq.g_augment"] for a in STUDIES["components"])
    collapse = {a.name: a.overrides for a in STUDIES["collapse"]}  # L_inter alone, centred or not
    assert collapse["inter"]["iuq.inter_center"] is False and collapse["inter_center"]["iuq.inter_center"] is True
    assert not collapse["inter"]["iuq.equi"] and collapse["inter"]["iuq.inter"]
    with pytest.raises(ValueError, match="--study"):
        study_arms("nope")


def test_readings_combine_switches_and_refuse_conflicts():
    arms = study_arms("readings", ["inter_center", "inter_center+instance_reduction+warmup_300"])
    assert [a.name for a in arms] == ["baseline", "inter_center", "inter_center+instance_reduction+warmup_300"]
    combo = arms[-1].overrides
    assert combo["iuq.inter_center"] is True and combo["iuq.query_reduction"] == "instance"
    assert combo["iuq.warmup_steps"] == 300 and combo["iuq.inter"] is True and combo["iuq.equi"] is True
    with pytest.raises(ValueError, match="sets iuq.equi_stopgrad to both"):
        study_arms("readings", ["stopgrad_features+stopgrad_queries"])
    with pytest.raises(ValueError, match="not a switch arm"):
        study_arms("readings", ["baseline+inter_center"])  # the reference is no switch
    with pytest.raises(ValueError, match="not a switch arm"):
        study_arms("readings", ["inter_center+nope"])


def test_a_small_study_runs_resumes_and_refuses_other_settings(tiny_data, tmp_path, capsys):  # noqa: F811
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = tiny_overrides(tiny_data, tmp_path / "unused", **{"train.max_epochs": 1, "train.eval_every_epochs": 1})
    sets.append("train.log_grad_share_every=1")
    args = ["ablate", str(config), "--study", "components", "--arms", "both", "--seeds", "2", "--out"]
    out = tmp_path / "study"
    flags = [a for kv in sets for a in ("--set", kv)]
    assert main([*args, str(out), *flags]) == 0
    for name in ("results.md", "results.csv", "results.json", "results.png", "curves.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["n"]) for r in report["arms"]] == [("baseline", 2), ("both", 2)]
    for arm in ("baseline", "both"):
        for seed in (0, 1):
            assert (out / "runs" / arm / f"seed{seed}" / "metrics.json").is_file()
            summary = json.loads((out / "summaries" / arm / f"seed{seed}.json").read_text())
            assert summary["seed"] == seed and summary["val_curve"] and summary["s_per_step"] > 0
            # one epoch, val every epoch: the last evaluation is of the final model, logged at steps - 1 (late_ap)
            assert summary["steps"] > 0 and summary["val_curve"][-1][0] == summary["steps"] - 1
            assert summary["command"].startswith(f"iuq train {config}")
            assert summary["model"] == "mask2former"  # the config's default type
            assert [r["from_step"] for r in summary["environment"]] == [0]  # one start, from scratch
    both = json.loads((out / "summaries" / "both" / "seed0.json").read_text())["logged_means"]
    assert "diag/grad_share/query/inter" in both and "train/loss_inter" in both
    md = (out / "results.md").read_text()
    # Mask2Former's own Table 1 rows (Swin-S, test-dev), not CondInst's Table 3 (38.1, +2.6)
    assert "`both`" in md and "paper AP" in md and "46.7 (+2.2)" in md and "38.1" not in md
    capsys.readouterr()

    mtime = (out / "runs" / "both" / "seed1" / "metrics.json").stat().st_mtime
    assert main([*args, str(out), *flags]) == 0  # everything is finished: nothing runs again
    assert capsys.readouterr().out.count("finished earlier") == 4
    assert (out / "runs" / "both" / "seed1" / "metrics.json").stat().st_mtime == mtime

    assert main([*args, str(out), *flags, "--set", "train.lr=0.002"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_regime_map_reports_paired_gains_per_regime(tmp_path):
    from iuq.study.regime_map import write_map

    def study(path, base, both):
        runs = [{"arm": "baseline", "seed": s, "metrics": {"AP": v}} for s, v in enumerate(base)]
        runs += [{"arm": "both", "seed": s, "metrics": {"AP": v}} for s, v in enumerate(both)]
        path.mkdir()
        (path / "results.json").write_text(json.dumps({"arms": [{"arm": "baseline"}, {"arm": "both"}], "runs": runs}))
        return path

    a = study(tmp_path / "a", [10.0, 11.0, 12.0], [12.0, 13.0, 14.0])  # +2 on every seed: CI of width 0
    b = study(tmp_path / "b", [10.0, 11.0, 12.0], [9.0, 12.0, 11.0])  # -1, +1, -1
    write_map(tmp_path / "map.md", {"alike": a, "unique": b})
    text = (tmp_path / "map.md").read_text()
    assert "| alike | 11.00 | +2.00 ± 0.00 ▲ |" in text
    half = 4.302652729911275 * math.sqrt(4 / 3) / math.sqrt(3)  # diffs -1, 1, -1: sd = sqrt(4/3)
    assert f"| unique | 11.00 | -0.33 ± {half:.2f} |" in text
    assert (tmp_path / "map.png").is_file()


def test_a_failed_run_stops_the_study_before_the_next_starts(tiny_data, tmp_path, capsys):  # noqa: F811
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = tiny_overrides(tiny_data, tmp_path / "unused", **{"train.max_steps": 2})
    sets.append(f"data.train_ann={tmp_path / 'missing.json'}")  # every run fails at once
    flags = [a for kv in sets for a in ("--set", kv)]
    out = tmp_path / "study"
    args = ["ablate", str(config), "--study", "components", "--arms", "both", "--seeds", "2", "--jobs", "1"]
    assert main([*args, "--out", str(out), *flags]) == 2
    assert "arm baseline seed 0 failed" in capsys.readouterr().err
    started = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").glob("*/*") if p.is_dir())
    assert started == ["baseline/seed0"]


@pytest.mark.parametrize("claim", [False, True], ids=["train-lock", "ablate-claim"])
def test_a_run_another_process_is_training_is_left_to_it(tiny_data, tmp_path, capsys, claim):  # noqa: F811
    """Held by a running `iuq train` (its folder's lock) or by another `iuq ablate` whose child has
    not locked the folder yet (the claim beside it): either way the run is not touched."""
    from iuq.engine.run_dir import RunLock

    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = tiny_overrides(tiny_data, tmp_path / "unused", **{"train.max_steps": 2})
    flags = [a for kv in sets for a in ("--set", kv)]
    out = tmp_path / "study"
    busy = out / "runs" / "baseline" / "seed0"  # a second `iuq ablate` is training it, no checkpoint yet
    busy.mkdir(parents=True)
    (busy / "train.log").write_text("step 1/2\n")
    lock = RunLock(busy, claim=claim).acquire()
    try:
        args = ["ablate", str(config), "--study", "components", "--arms", "both", "--seeds", "1", "--jobs", "1"]
        assert main([*args, "--out", str(out), *flags]) == 0
    finally:
        lock.release()
    printed = capsys.readouterr().out
    assert "arm baseline seed 0: left to the process training it" in printed
    assert "1 run(s) still in training by another process" in printed
    assert (busy / "train.log").read_text() == "step 1/2\n"  # its run directory untouched
    assert not (out / "summaries" / "baseline").exists()
    assert (out / "summaries" / "both" / "seed0.json").is_file()
    report = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["n"]) for r in report["arms"]] == [("baseline", 0), ("both", 1)]


def test_a_run_taken_after_the_probe_is_left_to_its_taker(tiny_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A plain `iuq train` locks the folder after `iuq ablate` probed it: the child exits 75 and the
    study goes on with its other runs instead of failing."""
    from iuq.engine.run_dir import RunLock
    from iuq.study import runner

    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = tiny_overrides(tiny_data, tmp_path / "unused", **{"train.max_steps": 2})
    flags = [a for kv in sets for a in ("--set", kv)]
    out = tmp_path / "study"
    taken = out / "runs" / "baseline" / "seed0"
    held, real_call = [], subprocess.call

    def call_after_someone_took_baseline(cmd, **kwargs):
        if Path(cmd[cmd.index("--out") + 1]) == taken:
            held.append(RunLock(taken).acquire())
        return real_call(cmd, **kwargs)

    monkeypatch.setattr(runner.subprocess, "call", call_after_someone_took_baseline)
    args = ["ablate", str(config), "--study", "components", "--arms", "both", "--seeds", "1", "--jobs", "1"]
    try:
        assert main([*args, "--out", str(out), *flags]) == 0
    finally:
        held[0].release()
    printed = capsys.readouterr().out
    assert f"arm baseline seed 0: left to the process training it ({taken} was taken by another iuq process" in printed
    assert "is in use by another iuq process" in (taken / "train.log").read_text()  # the child's own refusal
    assert not (taken / "checkpoints").exists()
    assert (out / "summaries" / "both" / "seed0.json").is_file()


def test_two_studies_started_together_train_each_run_once(tiny_data, tmp_path):  # noqa: F811
    """The race of two `iuq ablate` processes on one folder, for real: both exit 0 and no run is
    started twice (each run's provenance records one start)."""
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    sets = tiny_overrides(tiny_data, tmp_path / "unused", **{"train.max_steps": 2})
    flags = [a for kv in sets for a in ("--set", kv)]
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "iuq.cli", "ablate", str(config), "--study", "components", "--arms", "both",
           "--seeds", "1", "--jobs", "1", "--out", str(out), *flags]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for arm in ("baseline", "both"):
        summary = json.loads((out / "summaries" / arm / "seed0.json").read_text())
        assert [r["from_step"] for r in summary["environment"]] == [0]


def test_a_later_model_section_changes_the_fingerprint_of_its_own_model_type_only():
    from pathlib import Path

    from iuq.study.runner import fingerprint

    config = Path(__file__).parents[1] / "configs" / "solov2_demo.yaml"
    solov2 = fingerprint(config, [])
    assert fingerprint(config, ["model.sotr.depth=3"]) == solov2  # a study begun before SOTR resumes
    assert fingerprint(config, ["model.solov2.head_convs=3"]) != solov2
    sotr = Path(__file__).parents[1] / "configs" / "sotr_demo.yaml"
    assert fingerprint(sotr, ["model.sotr.depth=3"]) != fingerprint(sotr, [])


def test_curves_of_resumed_seeds_meet_on_one_grid():
    """Seeds evaluated at shifted steps (a resumed run) are interpolated onto one grid, not dropped."""
    from iuq.study.report import common_grid

    grid, table = common_grid([[[80, 1.0], [160, 3.0], [1100, 5.0]], [[79, 2.0], [159, 4.0], [1100, 6.0]]])
    assert grid[:3].tolist() == [80, 120, 160] and grid[-2:].tolist() == [1080, 1100]
    assert table.shape == (2, grid.size)
    assert table[0, :3].tolist() == [1.0, 2.0, 3.0]  # seed 0 on its own evaluations, halfway between
    assert table[1, 0] == pytest.approx(2.0 + 2.0 * 1 / 80)  # seed 1 between its steps 79 and 159
    assert common_grid([[[80, 1.0], [100, 2.0]], [[200, 1.0], [300, 2.0]]]) == (None, None)


def test_two_studies_in_one_folder_keep_their_own_reports(tmp_path):
    """Readings and components share a baseline (same fingerprint), so one folder may hold both; the
    second report must not overwrite the first."""
    from iuq.study.report import METRICS
    from iuq.study.runner import report_only

    def summary(arm, seed, ap):
        metrics = {key: ap for key in METRICS}
        return {"arm": arm, "seed": seed, "metrics": metrics, "val_curve": [[10, ap - 1.0]], "steps": 20}

    out = tmp_path / "study"
    for arm, aps in {"baseline": (10.0, 12.0), "both": (11.0, 12.0), "equi_unit": (13.0, 15.0)}.items():
        (out / "summaries" / arm).mkdir(parents=True)
        for seed, ap in enumerate(aps):
            (out / "summaries" / arm / f"seed{seed}.json").write_text(json.dumps(summary(arm, seed, ap)))
    report_only(out, "components")
    report_only(out, "readings", ["both", "equi_unit"])
    components = json.loads((out / "results.json").read_text())
    readings = json.loads((out / "readings_results.json").read_text())
    assert components["study"] == "components" and readings["study"] == "readings"
    assert [r["arm"] for r in components["arms"]] == ["baseline", "both"]
    assert [r["arm"] for r in readings["arms"]] == ["baseline", "both", "equi_unit"]
    assert readings["arms"][2]["paired"]["AP"][:2] == [3.0, 0.0]  # +3 on both seeds
    assert "`equi_unit`" in (out / "readings_results.md").read_text()
    assert "`equi_unit`" not in (out / "results.md").read_text()
    for name in ("results.csv", "results.png", "curves.png"):
        assert (out / name).is_file() and (out / f"readings_{name}").is_file(), name


def test_paper_rows_follow_the_studied_model(tmp_path, monkeypatch):
    """The paper ablates CondInst only: other models get their Table 1 rows in `components` and no
    row elsewhere; summaries from before they named their model tell it by their command's config."""
    from iuq.study.arms import paper_rows, study_arms
    from iuq.study.report import METRICS
    from iuq.study.runner import report_only, summaries_model

    components = study_arms("components")
    caption, rows = paper_rows("components", components, "sotr")
    assert "sotr ResNet-50" in caption and "Table 1" in caption
    assert [None if r is None else r["AP"] for r in rows.values()] == [39.6, None, None, 42.2]
    assert paper_rows("components", components, "condinst")[1]["both"]["AP"] == 38.1  # Table 3
    assert paper_rows("components", components, None)[1]["inter"]["AP"] == 37.6
    assert set(paper_rows("readings", study_arms("readings"), "solov2")[1].values()) == {None}
    assert set(paper_rows("components", components, "queryinst")[1].values()) == {None}

    monkeypatch.chdir(tmp_path)
    Path("solo.yaml").write_text("model:\n  type: solov2\n")
    old = {"arm": "baseline", "seed": 0, "command": "iuq train solo.yaml --out x --set train.seed=0"}
    assert summaries_model([old]) == "solov2"
    assert summaries_model([{**old, "command": "iuq train gone.yaml --out x"}]) is None
    assert summaries_model([old, {**old, "model": "sotr"}]) is None  # two models: no single row
    # A model.type override decides; a --set key that no longer exists does not hide the model.
    cmd = "iuq train solo.yaml --out x --set model.type=condinst --set iuq.gone_key=1"
    assert summaries_model([{**old, "command": cmd}]) == "condinst"

    out = tmp_path / "study"
    for arm, ap in (("baseline", 10.0), ("both", 12.0)):
        (out / "summaries" / arm).mkdir(parents=True)
        summary = {**old, "arm": arm, "metrics": {key: ap for key in METRICS}, "val_curve": [], "steps": 20}
        (out / "summaries" / arm / "seed0.json").write_text(json.dumps(summary))
    report_only(out, "components")
    md = (out / "results.md").read_text()
    assert "solov2 ResNet-50" in md and "| 35.1 (+0.0) |" in md and "| 38.3 (+3.2) |" in md
