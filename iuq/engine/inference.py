"""Trained models for evaluation and prediction: from a run checkpoint or a `model/` directory.

A Mask2Former's `model/` directory is what `save_pretrained` wrote (config.json, model.safetensors)
plus the image processor's `preprocessor_config.json` (test-time resize); the COCO category id of
each label is kept in the model config as `coco_category_ids`, so plain transformers users have it
too. A dense model's (CondInst, SOLOv2, SOTR) is `config.json` (`iuq_model_type`, the run's `model` section, labels,
category ids, test-time size) and `model.safetensors` (the state dict, loadable with
`safetensors.torch.load_file` into `iuq.models.build.build_model(config)`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from iuq.data.coco import CocoInstances, DatasetError
from iuq.engine.data import ResizeShortSide, test_loader
from iuq.evaluation.coco_eval import CocoMaskEvaluator
from iuq.models.interface import batch_instances
from iuq.models.mask2former import IMAGENET_MEAN, IMAGENET_STD, Mask2FormerAdapter


class CheckpointError(ValueError):
    """A file is not a readable iuq checkpoint (the message names it)."""


@dataclass
class TrainedModel:
    model: torch.nn.Module  # a base model of `iuq.models.build` (Mask2FormerAdapter, CondInst, SOLOv2, SOTR)
    label_to_category: list[int]
    class_names: list[str]
    short_side: int
    max_size: int | None
    top_k: int = 100


def is_run_dir(path: Path) -> bool:
    """Whether `path` is the output directory of `iuq train` (config.yaml, model/, checkpoints/)."""
    return path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file()


def load_checkpoint(path: str | Path) -> dict:
    """A run checkpoint, loaded with `weights_only=True` (no arbitrary code runs on load)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as an iuq checkpoint ({type(e).__name__}: {e})") from e


def load_trained(path: str | Path) -> TrainedModel:
    """A model for inference from `checkpoints/*.ckpt`, a `model/` directory or a run directory
    (its `model/`, or its last checkpoint when the run has not finished)."""
    path = Path(path)
    if is_run_dir(path):
        path = path / "model" if (path / "model" / "config.json").is_file() else path / "checkpoints" / "last.ckpt"
    if path.is_dir():
        return _from_model_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or model directory")
    from iuq.engine.module import IUQModule

    ckpt = load_checkpoint(path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not an iuq training checkpoint (no hyper_parameters / state_dict)")
    module = IUQModule(**dict(ckpt["hyper_parameters"]), hf_config=ckpt.get("hf_config"), load_weights=False)
    module.load_state_dict(ckpt["state_dict"])
    cfg = module.cfg
    return TrainedModel(
        module.model.eval(),
        module.label_to_category,
        module.class_names,
        cfg.data.test_short_side,
        cfg.data.max_size,
        cfg.eval.detections,
    )


def _from_model_dir(path: Path) -> TrainedModel:
    from transformers import Mask2FormerForUniversalSegmentation

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a directory written by save_pretrained")
    try:
        settings = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    if "iuq_model_type" in settings:
        return _dense_from_model_dir(path, settings)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(path)
    config = model.config
    n = config.num_labels
    categories = getattr(config, "coco_category_ids", None)
    if categories is None:  # a model not trained by iuq: labels 0..n-1 are taken as COCO ids 1..n
        categories = list(range(1, n + 1))
        warnings.warn(
            f"{path}/config.json has no coco_category_ids; taking labels 0..{n - 1} as ids 1..{n}", stacklevel=2
        )
    names = [config.id2label[i] for i in range(n)]
    processor = path / "preprocessor_config.json"
    short, longest = 800, 1333  # the paper's test size
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if processor.is_file():
        settings = json.loads(processor.read_text())
        size = settings.get("size", {})
        short, longest = size.get("shortest_edge", short), size.get("longest_edge", longest)
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    else:
        warnings.warn(
            f"{path} has no preprocessor_config.json; resizing to shortest side {short}, longest {longest}",
            stacklevel=2,
        )
    return TrainedModel(Mask2FormerAdapter(model, mean, std).eval(), categories, names, short, longest)


def _dense_from_model_dir(path: Path, settings: dict) -> TrainedModel:
    from safetensors.torch import load_file

    from iuq.config import ConfigError, from_dict
    from iuq.models.build import build_model
    from iuq.models.config import ModelConfig

    try:
        cfg = from_dict(ModelConfig, settings["model"], "model")
        categories, names = settings["coco_category_ids"], settings["class_names"]
        short, longest = settings["test_short_side"], settings["max_size"]
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not an iuq model config ({type(e).__name__}: {e})") from e
    model = build_model(cfg, load_weights=False)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors beside config.json")
    model.load_state_dict(load_file(weights))
    return TrainedModel(model.eval(), categories, names, short, longest)


def save_model_dir(model, path: str | Path, label_to_category, class_names, short_side, max_size):
    """The trained model in `path` (`export` of the model: Mask2Former as `save_pretrained` of the
    plain HF model, the dense models as config.json + model.safetensors)."""
    model.export(Path(path), label_to_category, class_names, short_side, max_size)


@torch.no_grad()
def predict(trained: TrainedModel, batch: dict, device: torch.device | str = "cpu") -> list[dict]:
    """Instance predictions (original image size) for a collated batch."""
    model = trained.model.to(device)
    moved = {**batch, "images": batch["images"].to(device), "pixel_mask": batch["pixel_mask"].to(device)}
    return batch_instances(model, moved, trained.top_k)


def evaluate(
    trained: TrainedModel,
    dataset: CocoInstances,
    batch_size: int = 4,
    num_workers: int = 0,
    backend: str = "faster",
    device: torch.device | str = "cpu",
    max_dets: int = 100,
    metric: str = "coco",
) -> tuple[dict[str, float], list[dict]]:
    """COCO (or LVIS, `metric`) mask metrics of `trained` on `dataset` (maxDets = `max_dets`), and
    the results list."""
    if len(dataset.category_ids) != len(trained.label_to_category) or sorted(dataset.category_ids) != sorted(
        trained.label_to_category
    ):
        raise DatasetError(
            f"{dataset.ann_file}: its categories {dataset.category_ids} differ from the model's "
            f"{trained.label_to_category}; evaluate on data with the training categories"
        )
    evaluator = CocoMaskEvaluator(dataset.ann_file, trained.label_to_category, backend, max_dets, metric)
    for batch in test_loader(dataset, trained.short_side, trained.max_size, batch_size, num_workers):
        evaluator.process([t["image_id"] for t in batch["targets"]], predict(trained, batch, device))
    return evaluator.evaluate(), evaluator.results


def prepare_image(image: torch.Tensor, trained: TrainedModel):
    """One image tensor [3, H, W] in [0, 1] -> the (image, target) pair the collate function takes."""
    h, w = image.shape[-2:]
    target = {"masks": torch.zeros((0, h, w), dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.int64)}
    target["orig_size"] = (h, w)
    return ResizeShortSide(trained.short_side, trained.max_size)(image, target)
