"""Run configuration: YAML files validated into typed dataclasses.

    cfg = load_config("configs/demo.yaml", overrides=["train.lr=0.001", "iuq.equi=false"])

Every key is checked against the dataclass fields and their annotated types before any work
starts; an unknown key or a wrong type raises `ConfigError` naming the dotted key. `--set` values
are parsed as YAML scalars/lists, so `train.max_steps=200` is an int and `data.train_short_side=[96,160]`
a list. Relative paths are taken relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from iuq.core.config import IUQConfig
from iuq.data.holdout import HoldoutConfig
from iuq.data.paste import PasteConfig
from iuq.data.synthetic import SynthConfig
from iuq.models.config import ModelConfig


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type (the message names it)."""


def check_range(section: str, obj, bounds: dict[str, tuple[float | None, float | None]]) -> None:
    """Each field named in `bounds` lies in [lo, hi] (None: unbounded; a None value is not checked)."""
    for name, (lo, hi) in bounds.items():
        value = getattr(obj, name)
        if value is None or isinstance(value, str):
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            want = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"{section}.{name}: must be {want}, got {value!r}")


@dataclass(frozen=True)
class SyntheticDataConfig(SynthConfig):
    """The embedded synthetic dataset, generated into `dir` when the training annotations are absent."""

    dir: str = "data/synthetic"


@dataclass(frozen=True)
class PasteDataConfig(PasteConfig):
    """Pasted real objects (`iuq.data.paste`), generated into `dir` when the training annotations are absent."""

    dir: str = "data/coco128_paste"


@dataclass(frozen=True)
class HoldoutDataConfig(HoldoutConfig):
    """A dev split held out of a training set by source (`iuq.data.holdout`), written into `dir`
    when the training annotations are absent."""

    dir: str = "data/holdout"


@dataclass
class DataConfig:
    """COCO-format train / val splits and augmentation.

    train_short_side: (lo, hi) range of the random shortest side; max_size caps the long side.
    test_short_side: shortest side at evaluation and prediction.
    crop_p, crop_min, crop_max: probability and relative side range of the random crop augmentation
        (crop_min = crop_max gives fixed-size crops: e.g. 128 px patches of 256 px tiles, so that a
        CPU run takes more, cheaper steps).
    batch_size: images per device per step (the paper's 16 is the global batch: 8 GPUs x 2).
    synthetic: when set and `train_ann` does not exist, the embedded dataset is generated first.
    paste: the same for the pasted-object scenes built from a COCO-format source (`iuq data paste`).
    holdout: the same for a dev split held out of a training set by source (`iuq data holdout`).
    pin_memory: on a CUDA machine the loader puts training batches in page-locked memory, from
        which the copy to the GPU is faster (no effect on a CPU).
    repeat_factor_threshold: repeat-factor sampling of rare classes (LVIS; 0.001 in its recipes):
        an image is seen max(1, sqrt(t / f(c))) times per epoch for its rarest class c, f(c) being
        the fraction of training images with c (`iuq.data.lvis`). None: each image once.
    """

    train_ann: str = "data/synthetic/annotations/instances_train.json"
    train_images: str = "data/synthetic/train"
    val_ann: str | None = "data/synthetic/annotations/instances_val.json"
    val_images: str | None = "data/synthetic/val"
    synthetic: SyntheticDataConfig | None = None
    paste: PasteDataConfig | None = None
    holdout: HoldoutDataConfig | None = None
    train_short_side: list[int] = field(default_factory=lambda: [400, 1200])
    max_size: int = 1333
    test_short_side: int = 800
    flip_p: float = 0.5
    crop_p: float = 0.0
    crop_min: float = 0.6
    crop_max: float = 1.0
    batch_size: int = 2
    num_workers: int = 2
    skip_invalid: bool = False
    pin_memory: bool = True
    repeat_factor_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.repeat_factor_threshold is not None and not 0 < self.repeat_factor_threshold <= 1:
            raise ConfigError(f"data.repeat_factor_threshold: must be in (0, 1], got {self.repeat_factor_threshold!r}")
        check_range(
            "data",
            self,
            {"max_size": (1, None), "test_short_side": (1, None), "flip_p": (0, 1), "crop_p": (0, 1),
             "batch_size": (1, None), "num_workers": (0, None)},
        )  # fmt: skip
        if len(self.train_short_side) != 2 or not 1 <= self.train_short_side[0] <= self.train_short_side[1]:
            raise ConfigError(f"data.train_short_side: need [lo, hi] with 1 <= lo <= hi, got {self.train_short_side}")
        if not 0 < self.crop_min <= self.crop_max <= 1:
            raise ConfigError(
                f"data.crop_min, data.crop_max: need 0 < min <= max <= 1, got {self.crop_min}, {self.crop_max}"
            )


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass
class TrainConfig:
    """Optimiser, schedule and the Lightning trainer.

    optimizer: "adamw" or "sgd"; backbone_lr_mult scales the backbone's learning rate.
    schedule: "poly" ((1 - t/T)^poly_power), "step" (x step_gamma at each of step_milestones, given as
        fractions of the run) or "constant"; warmup_steps ramps linearly from warmup_factor * lr.
    max_steps / max_epochs: length of the run (max_steps wins when both are set).
    precision: "32-true", "bf16-mixed" (autocast to bf16: the GPU default for large runs; also on the
        CPU) or "16-mixed" (fp16 with a gradient scaler, for GPUs without bf16). Under either mixed
        mode the losses, L_equi's sampling grid and CondInst's relative coordinates still run in fp32
        (docs/design.md, "Precision").
    tf32: on CUDA, let fp32 matrix products use TF32 (`torch.set_float32_matmul_precision("high")`).
    accelerator, devices, num_nodes, strategy: passed to `lightning.Trainer` (DDP under torchrun or
        SLURM is detected by Lightning).
    checkpoint_every_steps: also write checkpoints/last.ckpt every this many steps (0: epochs only).
    eval_every_epochs: COCO evaluation on the val split every this many epochs' worth of steps,
        counted from step 0 (so an interrupted and resumed run evaluates at the same steps); 0: only
        at the end.
    deterministic: true (deterministic kernels only: on CUDA some backward passes used here, bilinear
        upsampling and grid_sample, have none and raise), "warn" (deterministic where one exists,
        a warning elsewhere) or false. CPU runs are deterministic either way.
    log_every_steps: write every loss term to logs/ every this many steps.
    print_every_steps: print a progress line (loss, s/step, time left) every this many steps.
    log_grad_share_every: every this many steps (0: never) log each loss term's share of the
        gradient norm at the pixel embeddings and at the queries, and L_inter split by same-class
        and other-class negatives (docs/evidence.md reads these).
    threads: torch CPU threads (None: torch's default).
    """

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    backbone_lr_mult: float = 0.1
    schedule: str = "poly"
    poly_power: float = 0.9
    step_milestones: list[float] = field(default_factory=lambda: [0.889, 0.963])
    step_gamma: float = 0.1
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    grad_clip: float = 0.01
    max_steps: int | None = None
    max_epochs: int | None = 12
    precision: str = "32-true"
    tf32: bool = True
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    deterministic: bool | str = False
    checkpoint_every_steps: int = 500
    eval_every_epochs: int = 1
    log_every_steps: int = 10
    print_every_steps: int = 50
    log_grad_share_every: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"train.optimizer: {self.optimizer!r} is not one of ('adamw', 'sgd')")
        if self.schedule not in ("poly", "step", "constant"):
            raise ConfigError(f"train.schedule: {self.schedule!r} is not one of ('poly', 'step', 'constant')")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.deterministic not in (True, False, "warn"):
            raise ConfigError(f"train.deterministic: {self.deterministic!r} is not one of (true, false, 'warn')")
        if self.max_steps is None and self.max_epochs is None:
            raise ConfigError("train.max_steps / train.max_epochs: set at least one")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr!r}")
        check_range(
            "train",
            self,
            {"max_steps": (1, None), "max_epochs": (1, None), "warmup_steps": (0, None),
             "warmup_factor": (0, 1), "weight_decay": (0, None), "momentum": (0, 1),
             "backbone_lr_mult": (0, None), "poly_power": (0, None), "step_gamma": (0, None),
             "grad_clip": (0, None), "num_nodes": (1, None), "checkpoint_every_steps": (0, None),
             "eval_every_epochs": (0, None), "log_every_steps": (1, None), "print_every_steps": (1, None),
             "log_grad_share_every": (0, None), "threads": (1, None)},
        )  # fmt: skip
        if isinstance(self.devices, int) and self.devices < 1:
            raise ConfigError(f"train.devices: must be >= 1 or 'auto', got {self.devices}")


@dataclass
class EvalConfig:
    """COCO mask AP on the val split, and the prediction pictures of a run.

    max_dets: COCO's maxDets, detections per image that count (100 in COCO; raise it for crowded
        images: `iuq data stats` reports images with more instances than this).
    top_k: detections the model keeps per image (None: max_dets).
    backend: "faster" (faster-coco-eval) or "pycocotools".
    metric: "coco" or "lvis" (LVIS v1's federated mask AP with AP_r / AP_c / AP_f; needs backend
        "faster"; LVIS counts max_dets 300).
    num_vis: val images drawn to predictions/*.png at the end (ground truth beside prediction).
    vis_threshold: score threshold of the drawn predictions.
    """

    max_dets: int = 100
    top_k: int | None = None
    backend: str = "faster"
    metric: str = "coco"
    num_vis: int = 4
    vis_threshold: float = 0.5
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_range(
            "eval",
            self,
            {"max_dets": (1, None), "num_vis": (0, None), "vis_threshold": (0, 1), "batch_size": (1, None)},
        )
        if self.metric not in ("coco", "lvis"):
            raise ConfigError(f"eval.metric: {self.metric!r} is not one of ('coco', 'lvis')")
        if self.metric == "lvis" and self.backend != "faster":
            raise ConfigError("eval.metric: lvis needs eval.backend faster (faster-coco-eval's lvis_style)")
        if self.top_k is not None and self.top_k < self.max_dets:
            raise ConfigError(
                f"eval.top_k: {self.top_k} keeps fewer detections than eval.max_dets {self.max_dets} counts; "
                "raise it or leave it unset"
            )

    @property
    def detections(self) -> int:
        """Detections kept per image."""
        return self.top_k if self.top_k is not None else self.max_dets


@dataclass
class RunConfig:
    """A whole run: `iuq train CONFIG` reads one of these."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    iuq: IUQConfig = field(default_factory=IUQConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs/demo"

    def to_dict(self) -> dict:
        return asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """`value` checked (and int widened to float) against annotation `tp`; ConfigError names `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; valid keys under '{prefix or 'top level'}': "
            f"{sorted(names)}"
        )
    kwargs = {name: _convert(value, hints[name], where + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ConfigError(message if message.startswith(where) or not prefix else f"{prefix}: {message}") from e


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (or the defaults) plus dotted `KEY=VALUE` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist (shipped configs are in configs/)")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return from_dict(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
