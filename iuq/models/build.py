"""`model.type` -> the base segmenter, behind iuq's base-model interface (`iuq.models.interface`).

One spec per model: its name, its builder, and the words the engine prints about it. A new model is
its own file plus one entry in `SPECS`; the engine never names a model type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from iuq.models.condinst import CondInst
from iuq.models.config import MODEL_TYPES, ModelConfig
from iuq.models.mask2former import Mask2FormerAdapter, build_mask2former, mask2former_from_config
from iuq.models.queryinst import QueryInst
from iuq.models.solov2 import SOLOv2
from iuq.models.sotr import SOTR


@dataclass(frozen=True)
class ModelSpec:
    """name: the `model.type` value. build(cfg, load_weights, hf_config) -> the model in train mode's
    module. describe(cfg) -> the head's one-line description (run summary). export_note: how the
    exported `model/` folder loads."""

    name: str
    build: Callable[[ModelConfig, bool, dict | None], nn.Module]
    describe: Callable[[ModelConfig], str]
    export_note: str


def _mask2former(cfg: ModelConfig, load_weights: bool, hf_config: dict | None) -> nn.Module:
    model = build_mask2former(cfg) if hf_config is None else mask2former_from_config(hf_config, cfg.freeze_bn)
    return Mask2FormerAdapter(model, cfg.image_mean, cfg.image_std)


DENSE_EXPORT = "config.json + model.safetensors; iuq eval / predict take it"
SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mask2former", _mask2former, lambda cfg: f"Mask2Former, {cfg.num_queries} queries",
            "loads with Mask2FormerForUniversalSegmentation.from_pretrained",
        ),
        ModelSpec(
            "condinst", lambda cfg, load_weights, hf_config: CondInst(cfg, cfg.num_labels, load_weights),
            lambda cfg: "CondInst (FCOS P3-P7, 169 dynamic parameters)", DENSE_EXPORT,
        ),
        ModelSpec(
            "solov2", lambda cfg, load_weights, hf_config: SOLOv2(cfg, cfg.num_labels, load_weights),
            lambda cfg: f"SOLOv2 (grids {'/'.join(str(s) for s in cfg.solov2.grids)})", DENSE_EXPORT,
        ),
        ModelSpec(
            "sotr", lambda cfg, load_weights, hf_config: SOTR(cfg, cfg.num_labels, load_weights),
            lambda cfg: f"SOTR (twin transformer {cfg.sotr.depth} x {cfg.sotr.fpn_channels}, grids "
            f"{'/'.join(str(s) for s in cfg.sotr.grids)})", DENSE_EXPORT,
        ),
        ModelSpec(
            "queryinst", lambda cfg, load_weights, hf_config: QueryInst(cfg, cfg.num_labels, load_weights),
            lambda cfg: f"QueryInst ({cfg.queryinst.proposals} proposals, {cfg.queryinst.stages} stages, "
            f"RoI masks {2 * cfg.queryinst.mask_pool} px)", DENSE_EXPORT,
        ),
    )
}  # fmt: skip
assert tuple(SPECS) == MODEL_TYPES
BUILDERS = {name: spec.build for name, spec in SPECS.items()}


def model_spec(cfg: ModelConfig) -> ModelSpec:
    if cfg.type not in SPECS:
        raise ValueError(f"model.type: {cfg.type!r} is not one of {tuple(SPECS)}")
    return SPECS[cfg.type]


def build_model(cfg: ModelConfig, load_weights: bool = True, hf_config: dict | None = None) -> nn.Module:
    """The model of `cfg.type` with `cfg.num_labels` classes, in train mode.

    load_weights: load pretrained weights (False: a checkpoint's weights are about to fill it; no
    download or weights package is touched). hf_config: Mask2Former's architecture as a checkpoint
    saved it (the HF config dict); given, it replaces building from `cfg`.
    """
    return model_spec(cfg).build(cfg, load_weights, hf_config).train()
