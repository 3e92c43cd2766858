"""A dev split held out of a training set by source: settings are chosen on it, never on val.

Tiles cut from one large image look alike, so a dev split must not share a source with the images
trained on. The source of an image is the part of its file name before `sep` (nuclei24's
`0007_12.jpg` comes from source image 0007). The images stay where they are: only two instances
JSON files are written, both pointing into the original image folder.

    OUT/annotations/instances_train.json   the training set without the held-out sources
    OUT/annotations/instances_dev.json     the held-out sources
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class HoldoutError(ValueError):
    """The hold-out cannot be made as asked; the message names the file and what to change."""


@dataclass(frozen=True)
class HoldoutConfig:
    """source_ann: the training set's instances JSON. hold_out: the sources that become dev (file-name
    prefixes, e.g. "0007"). sep: where a file name's source prefix ends."""

    source_ann: str = "../shared/datasets/nuclei24/annotations/instances_train.json"
    hold_out: list[str] = field(default_factory=list)
    sep: str = "_"

    def __post_init__(self) -> None:
        if not self.hold_out:
            raise HoldoutError("hold_out: name at least one source to hold out (e.g. ['0007'])")
        if not self.sep:
            raise HoldoutError("sep: must be a non-empty string")


def source_of(file_name: str, sep: str) -> str:
    """The source prefix of an image file name ("0007_12.jpg" -> "0007")."""
    return Path(file_name).name.split(sep)[0]


def write_holdout(out: str | Path, cfg: HoldoutConfig) -> dict[str, int]:
    """Write the two JSON files (module docstring); returns the images in each."""
    path = Path(cfg.source_ann)
    if not path.is_file():
        raise HoldoutError(f"{path}: no such annotations file")
    data = json.loads(path.read_text())
    sources = {source_of(im["file_name"], cfg.sep) for im in data["images"]}
    missing = sorted(set(cfg.hold_out) - sources)
    if missing:
        raise HoldoutError(f"{path}: no image comes from source(s) {missing}; its sources are {sorted(sources)}")
    if set(cfg.hold_out) >= sources:
        raise HoldoutError(f"{path}: holding out {sorted(cfg.hold_out)} leaves nothing to train on")
    held = {im["id"] for im in data["images"] if source_of(im["file_name"], cfg.sep) in cfg.hold_out}
    (Path(out) / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, keep in (("train", lambda i: i not in held), ("dev", lambda i: i in held)):
        part = {
            **{k: v for k, v in data.items() if k not in ("images", "annotations")},
            "images": [im for im in data["images"] if keep(im["id"])],
            "annotations": [a for a in data["annotations"] if keep(a["image_id"])],
        }
        (Path(out) / "annotations" / f"instances_{split}.json").write_text(json.dumps(part))
        counts[split] = len(part["images"])
    return counts
