"""CondInst's dynamic mask head: the 169-parameter layout and its relative coordinates."""

import pytest
import torch
import torch.nn.functional as F

from iuq.config import load_config
from iuq.models.build import build_model


def tiny_condinst():
    head = ["model.condinst.fpn_channels=32", "model.condinst.head_convs=1",
            "model.condinst.mask_branch_channels=32", "model.condinst.mask_branch_convs=1"]  # fmt: skip
    cfg = load_config(None, ["model.type=condinst", "model.backbone=resnet", "model.backbone_widths=[8,16,16,16]",
                             "model.num_labels=2", *head])  # fmt: skip
    return build_model(cfg.model)


def grouped_conv_reference(params, mask_feats, rel):
    """AdelaiDet's dense form: the 169 numbers are [w1 (8x10), w2 (8x8), w3 (1x8), b1 (8), b2 (8), b3 (1)]
    and every instance is one group of a grouped 1x1 convolution over [rel_x, rel_y, 8 features].

    params [Q, 169], mask_feats [8, h, w], rel [Q, 2, h, w] -> logits [Q, h, w]."""
    q, (h, w) = params.shape[0], mask_feats.shape[1:]
    x = torch.cat([rel, mask_feats[None].expand(q, -1, -1, -1)], 1).reshape(1, q * 10, h, w)
    w1 = params[:, 0:80].reshape(q * 8, 10, 1, 1)
    w2 = params[:, 80:144].reshape(q * 8, 8, 1, 1)
    w3 = params[:, 144:152].reshape(q * 1, 8, 1, 1)
    b1, b2, b3 = params[:, 152:160].flatten(), params[:, 160:168].flatten(), params[:, 168:169].flatten()
    x = F.relu(F.conv2d(x, w1, b1, groups=q))
    x = F.relu(F.conv2d(x, w2, b2, groups=q))
    return F.conv2d(x, w3, b3, groups=q)[0]


def test_169_parameters_equal_the_grouped_convolution_reference():
    model = tiny_condinst()
    assert model.decoder.num_query_params() == 169
    assert model.head.controller.out_channels == 169
    torch.manual_seed(0)
    h, w = 5, 7  # mask features at stride 8 of a 40 x 56 canvas (not square)
    canvas = (h * 8, w * 8)
    feats = torch.randn(8, h, w, dtype=torch.float64)
    params = torch.randn(4, 169, dtype=torch.float64)
    loc = torch.tensor([[4.0, 4.0], [20.0, 12.0], [52.0, 36.0], [36.0, 28.0]], dtype=torch.float64)
    level = torch.tensor([0, 1, 2, 4])
    soi = torch.tensor([32.0, 64.0, 128.0, 256.0, 512.0], dtype=torch.float64)  # AdelaiDet: 64..1024
    model.cfg.sizes_of_interest = soi.tolist()
    ours = model.decode(feats, params, model.query_xy(loc, level, canvas).double())
    ys, xs = torch.meshgrid(torch.arange(h) * 8.0 + 4, torch.arange(w) * 8.0 + 4, indexing="ij")
    pix = torch.stack([xs, ys]).double()  # [2, h, w] input pixels of the cell centres
    rel = (loc[:, :, None, None] - pix[None]) / soi[level][:, None, None, None]
    # grid_xy gives the pixel coordinates in float32: agreement to float32 precision.
    torch.testing.assert_close(ours, grouped_conv_reference(params, feats, rel), atol=1e-6, rtol=1e-6)


def test_relative_coordinates_are_location_minus_pixel_over_size_of_interest():
    """A parameter vector that passes rel_x (layer 1 row 0 reads channel 0; biases keep the ReLUs in
    their linear range) reads back (x_location - x_pixel) / soi in input pixels."""
    model = tiny_condinst()
    p = torch.zeros(1, 169, dtype=torch.float64)
    p[0, 0] = 1.0  # w1[0, 0]: rel_x
    p[0, 80] = 1.0  # w2[0, 0]
    p[0, 144] = 1.0  # w3[0, 0]
    p[0, 152], p[0, 168] = 100.0, -100.0  # b1[0], b3
    h, w = 3, 4
    loc = torch.tensor([[12.0, 20.0]], dtype=torch.float64)
    qxy = model.query_xy(loc, torch.tensor([1]), (h * 8, w * 8)).double()  # level 1: soi 128
    out = model.decode(torch.zeros(8, h, w, dtype=torch.float64), p, qxy)[0]  # [h, w]
    expected = (12.0 - (torch.arange(w) * 8.0 + 4)) / 128.0
    torch.testing.assert_close(out, expected[None].expand(h, w).double())
    p[0, 0], p[0, 1] = 0.0, 1.0  # rel_y
    out = model.decode(torch.zeros(8, h, w, dtype=torch.float64), p, qxy)[0]
    torch.testing.assert_close(out[:, 0], ((20.0 - (torch.arange(h) * 8.0 + 4)) / 128.0).double())


def test_query_xy_columns():
    model = tiny_condinst()
    qxy = model.query_xy(torch.tensor([[16.0, 8.0]]), torch.tensor([2]), (64, 32))
    assert qxy.tolist() == [pytest.approx([16 / 32, 8 / 64, 256 / 32, 256 / 64])]
