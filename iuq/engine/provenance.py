"""Which code and libraries a run ran on.

A study's runs span days and are stopped and resumed, so one run can be trained partly on one
commit and partly on another, or on a rebuilt environment. `OUT/environment.json` therefore holds
one record per start of the run: the step it started from, the iuq version and git commit (with
whether the package's files differed from it), and the versions of the libraries that decide the
numbers. `iuq ablate` copies the records into each run's summary.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import iuq

LIBRARIES = (
    "torch",
    "torchvision",
    "lightning",
    "numpy",
    "scipy",
    "transformers",
    "timm",
    "faster-coco-eval",
    "pycocotools",
)


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on the machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict:
    """The installed iuq's version, and its git commit when it runs from a checkout (None otherwise).
    `dirty` says whether the package's tracked files differ from that commit."""
    package = Path(iuq.__file__).resolve().parent
    commit = _git(package.parent, "rev-parse", "HEAD") if (package.parent / ".git").exists() else None
    dirty = None
    if commit is not None:
        status = _git(package.parent, "status", "--porcelain", "--untracked-files=no", "--", package.name)
        dirty = bool(status) if status is not None else None
    try:
        version = metadata.version("iuq")
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        version = None
    return {"iuq": version, "commit": commit, "dirty": dirty}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record_start(out: Path, step: int) -> list[dict]:
    """Append this start's record to OUT/environment.json; returns all records of the run."""
    path = out / "environment.json"
    records = []
    if path.is_file():
        try:
            records = json.loads(path.read_text())
        except ValueError:  # a file cut short by a kill: keep its text, never stop a run over it
            records = [{"unreadable": path.read_text()[:4000]}]
    records.append(
        {
            "from_step": step,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **code_version(),
            "libraries": library_versions(),
        }
    )
    path.write_text(json.dumps(records, indent=1) + "\n")
    return records
