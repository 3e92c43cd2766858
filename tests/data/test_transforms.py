import torch

from iuq.core.views import boxes_from_masks
from iuq.data.coco import CocoInstances
from iuq.data.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    collate,
    crop,
    hflip,
    resize,
    resize_output_size,
)
from tests.conftest import COCO_IMAGES, COCO_JSON


def _sample():
    ds = CocoInstances(COCO_JSON, COCO_IMAGES)
    return ds[1]


def test_hflip_twice_is_identity():
    image, target = _sample()
    i2, t2 = hflip(*hflip(image, target))
    assert torch.equal(i2, image)
    assert torch.equal(t2["masks"], target["masks"])
    assert torch.equal(t2["boxes"], target["boxes"])


def test_hflip_boxes_are_the_boxes_of_flipped_masks():
    image, target = _sample()
    _, t = hflip(image, target)
    assert torch.equal(t["boxes"], boxes_from_masks(t["masks"]))
    w = image.shape[-1]
    assert torch.equal(t["boxes"][:, 0], w - target["boxes"][:, 2])


def test_crop_keeps_boxes_of_cropped_masks_and_drops_emptied_instances():
    image, target = _sample()
    h, w = image.shape[-2:]
    i2, t2 = crop(image, target, top=h // 3, left=w // 4, height=h // 2, width=w // 2)
    assert i2.shape == (3, h // 2, w // 2)
    assert t2["masks"].shape[1:] == (h // 2, w // 2)
    assert torch.equal(t2["boxes"], boxes_from_masks(t2["masks"]))
    assert bool(t2["masks"].flatten(1).any(1).all())
    # The kept instances are exactly those with a pixel inside the window.
    inside = target["masks"][:, h // 3 : h // 3 + h // 2, w // 4 : w // 4 + w // 2].flatten(1).any(1)
    assert t2["masks"].shape[0] == int(inside.sum()) < target["masks"].shape[0]
    assert torch.equal(t2["labels"], target["labels"][inside])


def test_resize_recipe_of_the_paper():
    # Shortest side 800 of a 480x640 image: 800x1067, under the 1333 cap.
    assert resize_output_size(480, 640, 800, 1333) == (800, 1067)
    # Shortest side 1200 would make the long side 1600 > 1333: capped.
    assert resize_output_size(480, 640, 1200, 1333) == (1000, 1333)
    torch.manual_seed(0)
    image, target = _sample()
    t = Compose([RandomResize((400, 1200), 1333), RandomHorizontalFlip(), RandomCrop((0.6, 1.0))])
    for _ in range(3):
        i2, t2 = t(image, target)
        assert t2["masks"].shape[1:] == i2.shape[1:]
        assert torch.equal(t2["boxes"], boxes_from_masks(t2["masks"]))
        assert t2["labels"].shape[0] == t2["masks"].shape[0]


def test_resize_to_the_own_size_equals_resampling_and_still_drops_empty_masks():
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    image, target = _sample()
    h, w = image.shape[-2:]
    masks = torch.cat([target["masks"], torch.zeros(1, h, w, dtype=torch.bool)])  # one empty instance
    target = {**target, "masks": masks, "labels": torch.cat([target["labels"], target["labels"][:1]])}
    i2, t2 = resize(image, target, (h, w))
    assert torch.equal(i2, TF.resize(image, [h, w], antialias=True))
    resampled = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0] > 0.5
    assert torch.equal(t2["masks"], resampled[:-1]) and t2["labels"].shape[0] == masks.shape[0] - 1
    assert torch.equal(t2["boxes"], boxes_from_masks(resampled[:-1]))


def test_collate_pads_to_multiple_of_32_with_valid_mask():
    a = (torch.ones(3, 50, 70), {"masks": torch.ones(2, 50, 70, dtype=torch.bool), "labels": torch.zeros(2)})
    b = (torch.ones(3, 65, 40), {"masks": torch.zeros(0, 65, 40, dtype=torch.bool), "labels": torch.zeros(0)})
    batch = collate([a, b])
    assert batch["images"].shape == (2, 3, 96, 96)
    assert batch["pixel_mask"].shape == (2, 96, 96)
    assert batch["pixel_mask"][0].sum() == 50 * 70 and batch["pixel_mask"][1].sum() == 65 * 40
    assert batch["images"][0, :, 50:].abs().sum() == 0 and batch["images"][0, :, :, 70:].abs().sum() == 0
    assert batch["targets"][0]["masks"].shape == (2, 96, 96) and batch["targets"][0]["masks"].sum() == 2 * 50 * 70
    assert batch["targets"][1]["masks"].shape == (0, 96, 96)
    assert batch["targets"][1]["size"] == (65, 40)
