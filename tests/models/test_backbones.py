"""Pretrained starts: ImageNet EfficientNet-Lite offline, HF backbone checkpoints from a folder,
frozen BatchNorm, train mode, and export to plain transformers."""

import json

import pytest
import torch

from iuq.models.backbones import (
    WeightsError,
    efficientnet_lite_state_dict,
    with_plain_batchnorm,
)
from iuq.models.mask2former import (
    Mask2FormerAdapter,
    ModelConfig,
    backbone_module,
    build_mask2former,
)
from tests.conftest import COCO_IMAGES, plain_transformers_max_diff

HEAD = {"conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"}
HEAD |= {"classifier.weight", "classifier.bias"}


def _small(**kw):
    base = dict(num_labels=2, num_queries=6, hidden_dim=32, mask_feature_size=32, encoder_layers=1, decoder_layers=1)
    base.update(train_num_points=64, heads=2, ffn_dim=32)
    base.update(kw)
    return build_mask2former(ModelConfig(**base))


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return _small(backbone="efficientnet_lite0")


def test_every_imagenet_tensor_lands_in_the_backbone(lite0):
    weights = efficientnet_lite_state_dict("efficientnet_lite0")
    assert len(weights) == 296
    backbone = backbone_module(lite0)._backbone.state_dict()
    assert set(weights) - set(backbone) == HEAD  # only the classifier head is not a feature backbone's
    for key, value in backbone.items():
        assert torch.equal(value, weights[key]), key


def test_backbone_weights_none_is_random_init():
    torch.manual_seed(0)
    model = _small(backbone="efficientnet_lite0", backbone_weights="none")
    weights = efficientnet_lite_state_dict("efficientnet_lite0")
    stem = backbone_module(model)._backbone.state_dict()["conv_stem.weight"]
    assert not torch.equal(stem, weights["conv_stem.weight"])


def _imagenet_top5(image_path) -> list[int]:
    """Top-5 ImageNet classes of timm's EfficientNet-Lite0 with the package's weights, on a centre
    crop normalised with the model config's default (ImageNet) mean and std."""
    import timm
    import torchvision.transforms.functional as F
    from PIL import Image

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite_state_dict("efficientnet_lite0"))
    model.eval()
    cfg = ModelConfig()
    x = F.to_tensor(F.center_crop(F.resize(Image.open(image_path).convert("RGB"), 256), 224))
    x = F.normalize(x, cfg.image_mean, cfg.image_std)[None]
    with torch.no_grad():
        return model(x)[0].topk(5).indices.tolist()


def test_imagenet_classifier_recognises_coco_animals():
    """Proves the key mapping and the normalisation: a wrong order or mean/std breaks these."""
    zebra = _imagenet_top5(COCO_IMAGES / "000000000034.jpg")
    assert zebra[0] == 340  # ImageNet class 340: zebra
    elephant = _imagenet_top5(COCO_IMAGES / "000000000263.jpg")
    assert {385, 386, 101} & set(elephant)  # Indian elephant, African elephant, tusker


def _save_hf_backbone(kind: str, folder):
    """A small random ResNet / Swin classification checkpoint, as the hub's microsoft/* ones are."""
    from transformers import ResNetConfig, ResNetForImageClassification, SwinConfig, SwinForImageClassification

    torch.manual_seed(1)
    if kind == "resnet":
        model = ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3)
        )
    else:
        model = SwinForImageClassification(
            SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4, num_labels=3)
        )
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    "kind, head",
    [
        ("resnet", {"classifier.1.weight", "classifier.1.bias"}),
        ("swin", {"classifier.weight", "classifier.bias"}),
    ],
)
def test_hf_backbone_checkpoint_from_a_folder(tmp_path, kind, head):
    source = _save_hf_backbone(kind, tmp_path / kind).state_dict()
    model = _small(backbone="hf", backbone_checkpoint=str(tmp_path / kind))
    encoder = backbone_module(model).state_dict()
    # HF's ResNetBackbone drops the classifier's "resnet." prefix; its SwinBackbone keeps "swin.".
    name = {k: k.removeprefix("resnet.") for k in source}
    landed = {k for k in source if name[k] in encoder}
    assert set(source) - landed == head  # all but the classification head
    for key in landed:
        assert torch.equal(encoder[name[key]], source[key]), key
    out = Mask2FormerAdapter(model)(torch.rand(1, 3, 64, 64))
    assert out.head["mask_logits"].shape == (1, 6, 16, 16)


def test_a_missing_hf_backbone_names_the_config_key(tmp_path):
    with pytest.raises(WeightsError, match="model.backbone_checkpoint"):
        _small(backbone="hf", backbone_checkpoint=str(tmp_path / "nothing-here"))


def test_hf_backbone_requires_a_checkpoint():
    with pytest.raises(ValueError, match="model.backbone_checkpoint"):
        ModelConfig(backbone="hf")


def test_every_module_trains_after_loading_a_pretrained_checkpoint(tmp_path, lite0):
    lite0.save_pretrained(tmp_path / "m2f")  # from_pretrained returns a model in eval mode
    loaded = build_mask2former(ModelConfig(pretrained=str(tmp_path / "m2f"), num_labels=2))
    assert all(m.training for m in loaded.modules())
    assert all(m.training for m in lite0.modules())


def test_frozen_batchnorm_stays_frozen_across_a_step():
    from timm.layers import FrozenBatchNormAct2d

    torch.manual_seed(0)
    model = _small(backbone="efficientnet_lite0", freeze_bn=True)
    backbone = backbone_module(model)._backbone
    assert isinstance(backbone.bn1, FrozenBatchNormAct2d)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    bn_before = {k: v for k, v in before.items() if k.startswith("bn1.") or ".bn" in k}
    adapter = Mask2FormerAdapter(model)
    optimizer = torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=0.1)
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    targets = [{"masks": masks, "labels": torch.tensor([0])}] * 2
    adapter(images, targets=targets).loss.backward()
    optimizer.step()
    after = backbone.state_dict()
    assert bn_before and all(torch.equal(v, after[k]) for k, v in bn_before.items())  # statistics and affine
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])  # the convolutions learn


def test_export_of_frozen_batchnorm_has_plain_layers_with_the_same_values():
    torch.manual_seed(0)
    model = _small(backbone="efficientnet_lite0", freeze_bn=True).eval()
    plain = with_plain_batchnorm(model).eval()
    assert type(backbone_module(plain)._backbone.bn1).__name__ == "BatchNormAct2d"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(pixel_values=x).masks_queries_logits, plain(pixel_values=x).masks_queries_logits
    assert (a - b).abs().max() < 1e-5  # frozen BN folds scale and shift first: float rounding only


def test_exported_pretrained_model_loads_in_plain_transformers(tmp_path, lite0):
    from iuq.engine.inference import save_model_dir

    save_model_dir(Mask2FormerAdapter(lite0).eval(), tmp_path / "model", [7, 9], ["a", "b"], 256, 256)
    assert plain_transformers_max_diff(tmp_path / "model", lite0, tmp_path) == 0.0
    processor = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    cfg = ModelConfig()
    assert processor["image_mean"] == pytest.approx(cfg.image_mean)
    assert processor["image_std"] == pytest.approx(cfg.image_std)
