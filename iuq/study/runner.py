"""`iuq ablate`: every arm x seed of a study as an ordinary run directory, then the report.

    DIR/runs/<arm>/seed<k>/        an `iuq train` run (iuq eval / iuq predict work on it); train.log
    DIR/summaries/<arm>/seed<k>.json   final metrics, val AP curve, s/step, the command (small: commit it)
    DIR/results.{md,csv,json,png}, DIR/curves.png   the report (iuq/study/report.py); a study other
                                     than `components` prefixes its name: DIR/readings_results.md, ...

Each run is its own `iuq train` process (the command is in its summary, so any row can be rerun
alone). A finished run (summary present) is skipped; a killed one resumes from its last checkpoint;
a run that failed before its first checkpoint starts again. A run that another process is training
(its run directory locked by an `iuq train`, or claimed by a second `iuq ablate` on the same DIR) is
left to that process and counted at the end if it has finished by then. The summaries carry a fingerprint of
the resolved config, so a rerun into the same DIR with other settings stops with an error instead
of mixing two studies.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

from iuq.config import ConfigError, load_config
from iuq.engine.run_dir import RunInUse, RunLock
from iuq.engine.train import prepare_data
from iuq.study.arms import Arm, study_arms
from iuq.study.choice import ChoiceError, choice_markdown, dev_scores
from iuq.study.report import write_report


class StudyError(RuntimeError):
    """A run of the study failed or the output folder holds a different study."""


class RunBusy(RuntimeError):
    """The run's directory is locked by another iuq process, which is training it."""


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def run_overrides(arm: Arm, seed: int, user_sets: list[str]) -> list[str]:
    """--set list of one run: the user's first, then the arm's and the seed (which win)."""
    return [*user_sets, *(f"{k}={_value(v)}" for k, v in arm.overrides.items()), f"train.seed={seed}"]


# Config keys added after studies were first fingerprinted, with the default at which they do not
# change a run: there they stay out of the hash, so a study begun before they existed resumes.
LATER_KEYS = (
    ("data", "paste", None),
    ("data", "holdout", None),
    ("iuq", "memory_dtype", "float32"),
    ("train", "tf32", True),
    ("eval", "metric", "coco"),
    ("data", "repeat_factor_threshold", None),
    ("iuq", "cuda_chunk_pairs", 2**26),
    ("iuq", "cpu_chunk_pairs", None),
    ("data", "pin_memory", True),
    ("iuq", "roi_memory_capacity", 1000),
    ("iuq", "roi_negatives", None),
    ("iuq", "roi_chunk_pairs", 256),
    ("iuq", "roi_stages", "last"),
)
# The head sections of model types added later: they do not change a run of another model type.
LATER_MODEL_SECTIONS = ("sotr", "queryinst")


def fingerprint(config: Path, sets: list[str]) -> str:
    """Hash of the resolved config without its output folder."""
    resolved = load_config(config, sets).to_dict()
    resolved.pop("out", None)
    for section, key, default in LATER_KEYS:
        if key in resolved.get(section, {}) and resolved[section][key] == default:
            del resolved[section][key]
    for name in LATER_MODEL_SECTIONS:
        if resolved["model"]["type"] != name:
            del resolved["model"][name]
    return hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def val_curve(run_dir: Path) -> list[list[float]]:
    """[[step, val AP], ...] from the run's CSV log."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    curve = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/AP"):
                curve[int(float(row["step"]))] = float(row["val/AP"])
    return [[s, ap] for s, ap in sorted(curve.items())]


def logged_means(run_dir: Path, prefixes=("train/loss_inter", "train/loss_equi", "diag/")) -> dict[str, float]:
    """Mean over the run of the IUQ terms and diagnostics in the CSV log (the evidence's diagnosis)."""
    path = run_dir / "logs" / "metrics.csv"
    sums: dict[str, list[float]] = {}
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key.startswith(prefixes):
                        sums.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def _optional_json(path: Path):
    """The file's content, or None when the run did not write it (runs from before it existed)."""
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def summarise(run_dir: Path, arm: Arm, seed: int, command: list[str], fp: str, minutes: float | None) -> dict:
    with open(run_dir / "metrics.json") as f:
        metrics = json.load(f)
    timing = _optional_json(run_dir / "timing.json") or {}
    with open(run_dir / "config.yaml") as f:
        model = yaml.safe_load(f)["model"]["type"]
    return {
        "arm": arm.name,
        "seed": seed,
        "model": model,  # which of the paper's rows the report shows
        "metrics": metrics,
        "val_curve": val_curve(run_dir),
        "s_per_step": timing.get("s_per_step"),
        "steps": timing.get("steps"),  # the final step: tells the final model's evaluation in val_curve
        "wall_minutes": minutes,
        "logged_means": logged_means(run_dir),
        "overrides": arm.overrides,
        "fingerprint": fp,
        "command": " ".join(command),
        "environment": _optional_json(run_dir / "environment.json"),  # one record per start (engine/provenance.py)
    }


def _train_command(config: Path, run_dir: Path, sets: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "iuq.cli", "train", str(config), "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def _shown(cmd: list[str]) -> list[str]:
    """The command as a user types it (`iuq train ...`, without --resume)."""
    return ["iuq", *[c for c in cmd[3:] if c != "--resume"]]


def run_one(config: Path, out: Path, arm: Arm, seed: int, sets: list[str], fp: str) -> dict:
    run_dir = out / "runs" / arm.name / f"seed{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Held until the child exits: the child takes the run's own lock only once it has started, and
    # a second `iuq ablate` probing in between would otherwise start the same run beside it.
    try:
        claim = RunLock(run_dir, claim=True).acquire()
    except RunInUse as err:
        raise RunBusy(str(err)) from None
    try:
        return _run_claimed(config, run_dir, arm, seed, sets, fp)
    finally:
        claim.release()


def _run_claimed(config: Path, run_dir: Path, arm: Arm, seed: int, sets: list[str], fp: str) -> dict:
    if run_dir.is_dir():
        # Probe before touching anything: a run that a plain `iuq train` trains may not have its
        # first checkpoint yet, and would look like a failed start to be deleted below.
        try:
            RunLock(run_dir).acquire().release()
        except RunInUse as err:
            raise RunBusy(str(err)) from None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (run_dir / "metrics.json").is_file():
        resume = last.is_file()
        if run_dir.exists() and not resume:  # failed before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = _train_command(config, run_dir, sets, resume)
        start = time.perf_counter()
        with open(run_dir / "train.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if rc == RunInUse.exit_code:  # a plain `iuq train` took the run's lock after the probe above
            raise RunBusy(f"{run_dir} was taken by another iuq process; see {run_dir / 'train.log'}")
        if rc != 0:
            tail = (run_dir / "train.log").read_text().strip().splitlines()[-3:]
            raise StudyError(f"arm {arm.name} seed {seed} failed (exit {rc}); see {run_dir / 'train.log'}: {tail}")
        minutes = (time.perf_counter() - start) / 60
    else:
        minutes = None
    cmd = _train_command(config, run_dir, sets, False)
    return summarise(run_dir, arm, seed, _shown(cmd), fp, minutes)


def ablate(
    config: Path,
    study: str,
    seeds: int,
    out: Path,
    user_sets: list[str] | None = None,
    arms: list[str] | None = None,
    jobs: int = 1,
    first_seed: int = 0,
) -> dict:
    """Run (or finish) a study and write its report; returns the report's data."""
    if seeds < 1:
        raise ValueError(f"--seeds: need at least 1, got {seeds}")
    user_sets = list(user_sets or [])
    cfg = load_config(config, user_sets)  # for the data and the report; the runs read the file themselves
    chosen = study_arms(study, arms)
    todo, summaries = [], []
    # Seed by seed: the arms of one seed finish together, so a stopped study already holds pairs.
    for seed in range(first_seed, first_seed + seeds):
        for arm in chosen:
            sets = run_overrides(arm, seed, user_sets)
            fp = fingerprint(config, sets)
            path = out / "summaries" / arm.name / f"seed{seed}.json"
            if path.is_file():
                with open(path) as f:
                    done = json.load(f)
                if done.get("fingerprint") != fp:
                    raise StudyError(
                        f"{path} is a run of other settings than this command's (config or --set differ); "
                        "use another --out, or delete that arm's summaries and runs to redo it"
                    )
                summaries.append(done)
                print(f"arm {arm.name} seed {seed}: finished earlier (AP {done['metrics']['AP']:.2f}), skipped")
                continue
            todo.append((arm, seed, sets, fp, path))
    if todo:  # once, before runs start side by side and would each write the synthetic data
        prepare_data(cfg)
    total, finished, t0 = len(todo), 0, time.perf_counter()
    print(f"study {study}: {len(chosen)} arms x {seeds} seeds, {total} run(s) to do, {jobs} at a time", flush=True)

    stop = threading.Event()  # set by a failed run or Ctrl-C: runs not started yet never start
    busy: list[tuple[Path, str]] = []  # (summary, fingerprint) of runs another process was training

    def work(item):
        if stop.is_set():
            return None
        arm, seed, sets, fp, path = item
        try:
            summary = run_one(config, out, arm, seed, sets, fp)
        except RunBusy as err:
            busy.append((path, fp))
            print(f"arm {arm.name} seed {seed}: left to the process training it ({err})", flush=True)
            return None
        except BaseException:
            stop.set()
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        return summary

    pool = ThreadPoolExecutor(max_workers=max(jobs, 1))
    try:
        futures = {pool.submit(work, item): item for item in todo}
        for future in as_completed(futures):
            summary = future.result()  # a failed run raises here, with its log's path
            if summary is None:
                continue
            summaries.append(summary)
            finished += 1
            elapsed = (time.perf_counter() - t0) / 60
            eta = elapsed / finished * (total - finished)
            print(
                f"[{finished}/{total}] arm {summary['arm']} seed {summary['seed']}: AP {summary['metrics']['AP']:.2f}"
                f"  ({summary['wall_minutes'] or 0:.1f} min)  ETA {eta:.0f} min",
                flush=True,
            )
    except BaseException:
        # A failed run or Ctrl-C stops the study: runs not started yet never start (the running ones
        # got the same Ctrl-C and checkpoint, or finish), so rerunning the command resumes cleanly.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    pending = []
    for path, fp in busy:
        done = json.loads(path.read_text()) if path.is_file() else None
        if done is not None and done.get("fingerprint") == fp:
            summaries.append(done)
        else:  # not finished yet, or (a foreign study) never to be mixed into this report
            pending.append(path)
    if pending:
        print(
            f"{len(pending)} run(s) still in training by another process are not in this report; "
            "rerun this command after they finish",
            flush=True,
        )
    order = {a.name: i for i, a in enumerate(chosen)}
    summaries.sort(key=lambda s: (order[s["arm"]], s["seed"]))
    return write_report(out, study, chosen, summaries, cfg.model.type)


def summaries_model(summaries: list[dict]) -> str | None:
    """The base model the summaries are runs of, or None when that is not known: summaries written
    before they named it tell it by their command's config, when that file is still there."""
    models = set()
    resolved: dict[tuple, str | None] = {}  # arms and seeds of one study share their config
    for s in summaries:
        model = s.get("model")
        if model is None:
            words = s.get("command", "").split()  # "iuq train CONFIG --out ... --set ..."
            if len(words) < 3 or not Path(words[2]).is_file():
                return None
            # Only a model.type override can change the answer; the other --set keys are not read.
            key = (words[2], tuple(w for w in words if w.startswith("model.type=")))
            if key not in resolved:
                try:
                    resolved[key] = load_config(Path(key[0]), list(key[1])).model.type
                except ConfigError:
                    resolved[key] = None
            model = resolved[key]
            if model is None:
                return None
        models.add(model)
    return models.pop() if len(models) == 1 else None


def _committed(out: Path, study: str, arms: list[str] | None) -> tuple[list, list[dict]]:
    """The study's arms that have summaries under DIR/summaries, and those summaries."""
    chosen = study_arms(study, arms)
    summaries = []
    for arm in chosen:
        for path in sorted((out / "summaries" / arm.name).glob("seed*.json")):
            with open(path) as f:
                summaries.append(json.load(f))
    if not summaries:
        raise StudyError(f"{out / 'summaries'} holds no run summary of study {study!r}")
    return [a for a in chosen if any(s["arm"] == a.name for s in summaries)], summaries


def report_only(out: Path, study: str, arms: list[str] | None = None) -> dict:
    """The report from the summaries under DIR/summaries alone (e.g. committed ones)."""
    chosen, summaries = _committed(out, study, arms)
    return write_report(out, study, chosen, summaries, summaries_model(summaries))


def choose(out: Path, study: str, arms: list[str] | None, seeds: tuple[int, ...]) -> str:
    """The dev rule of iuq/study/choice.py applied to the committed summaries; written to DIR/choice.md."""
    chosen, summaries = _committed(out, study, arms)
    unfinished = [a.name for a in study_arms(study, arms) if a not in chosen]
    if unfinished:  # an arm not run yet could be the one the rule picks
        raise StudyError(f"{out}: no finished run of arm(s) {unfinished}; the rule compares every arm of the study")
    try:
        scores = dev_scores(summaries, seeds, reference=chosen[0].name)
        text = choice_markdown(scores, {a.name: a.overrides for a in chosen})
    except ChoiceError as e:
        raise StudyError(f"{out}: {e}") from None
    (out / "choice.md").write_text(text)
    return text
