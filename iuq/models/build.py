"""`model.type` -> the base segmenter, behind iuq's base-model interface (DESIGN.md).

One plain mapping from name to builder. Every builder returns a module with: `forward(images,
pixel_mask, targets, views, view_loss)`, `matched`, `predict_instances`, `decoder`, `mask_loss`,
`mask_loss_weight`, `pixel_dim`, `stride`, `equi_normaliser` and `backbone_module`.
"""

from __future__ import annotations

from torch import nn

from iuq.models.condinst import CondInst
from iuq.models.config import MODEL_TYPES, ModelConfig
from iuq.models.mask2former import Mask2FormerAdapter, build_mask2former, mask2former_from_config
from iuq.models.solov2 import SOLOv2


def _mask2former(cfg: ModelConfig, load_weights: bool, hf_config: dict | None) -> nn.Module:
    model = build_mask2former(cfg) if hf_config is None else mask2former_from_config(hf_config, cfg.freeze_bn)
    return Mask2FormerAdapter(model, cfg.image_mean, cfg.image_std)


BUILDERS = {
    "mask2former": _mask2former,
    "condinst": lambda cfg, load_weights, hf_config: CondInst(cfg, cfg.num_labels, load_weights),
    "solov2": lambda cfg, load_weights, hf_config: SOLOv2(cfg, cfg.num_labels, load_weights),
}
assert tuple(BUILDERS) == MODEL_TYPES


def build_model(cfg: ModelConfig, load_weights: bool = True, hf_config: dict | None = None) -> nn.Module:
    """The model of `cfg.type` with `cfg.num_labels` classes, in train mode.

    load_weights: load pretrained weights (False: a checkpoint's weights are about to fill it; no
    download or weights package is touched). hf_config: Mask2Former's architecture as a checkpoint
    saved it (the HF config dict); given, it replaces building from `cfg`.
    """
    if cfg.type not in BUILDERS:
        raise ValueError(f"model.type: {cfg.type!r} is not one of {tuple(BUILDERS)}")
    return BUILDERS[cfg.type](cfg, load_weights, hf_config).train()
