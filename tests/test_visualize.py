import torch

from iuq.visualize import draw_instances, side_by_side, upscale_factor


def test_small_images_are_upscaled_by_a_whole_factor():
    assert upscale_factor(250, 250, 512) == 3
    assert upscale_factor(128, 300, 512) == 4
    assert upscale_factor(600, 800, 512) == 1


def _squares(n: int, size: int = 100) -> torch.Tensor:
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(n):
        r, c = divmod(k, 10)
        masks[k, 10 * r : 10 * r + 6, 10 * c : 10 * c + 6] = True
    return masks


def test_overlay_is_drawn_at_the_upscaled_size_with_outlines():
    image = torch.zeros(3, 100, 100)
    masks = _squares(1)
    out = draw_instances(image, masks, torch.tensor([0]), ["nucleus"], min_side=300)
    assert out.shape == (3, 300, 300) and out.dtype == torch.uint8
    # Square rows/cols 0-5 become 0-17 at 3x: its border is opaque, its inside half transparent.
    border, inside, outside = out[:, 0, 9], out[:, 9, 9], out[:, 60, 60]
    assert border.max() > inside.max() > 0 and outside.max() == 0


def test_labels_are_left_out_of_crowded_images():
    image = torch.zeros(3, 100, 100)
    masks = _squares(30)
    labels = torch.zeros(30, dtype=torch.int64)
    crowded = draw_instances(image, masks, labels, ["nucleus"], min_side=100, max_labels=25)
    bare = draw_instances(image, masks, labels, ["nucleus"], min_side=100, max_labels=100)
    assert not torch.equal(crowded, bare)  # the second has label boxes drawn
    few = draw_instances(image, masks[:3], labels[:3], ["nucleus"], min_side=100, max_labels=25)
    assert few.shape == (3, 100, 100)


def test_side_by_side_places_panels_under_titles():
    a = torch.full((3, 40, 30), 10, dtype=torch.uint8)
    b = torch.full((3, 40, 50), 200, dtype=torch.uint8)
    out = side_by_side([("ground truth", a), ("prediction", b)], gap=8)
    assert out.shape == (3, 40 + 18, 30 + 8 + 50)
    assert out[0, 18 + 20, 15] == 10 and out[0, 18 + 20, 30 + 8 + 25] == 200 and out[0, 18 + 20, 33] == 255
