"""SOTR's twin transformer against a hand-written reference, and its head's shapes and assignment."""

import math

import pytest
import torch

from iuq.config import load_config
from iuq.models.solo import solo_targets
from iuq.models.sotr import AxialAttention, TwinBlock, TwinTransformer
from tests.models.test_dense_training import batch, tiny


def reference_attention(layer: AxialAttention, seq: torch.Tensor) -> torch.Tensor:
    """One sequence [L, D] through `layer`'s weights, softmax(q k^T / sqrt(e)) v head by head."""
    d = seq.shape[1]
    e = d // layer.heads
    q = seq @ layer.to_q.weight.t()
    k, v = (seq @ layer.to_kv.weight.t()).split(d, dim=1)
    heads = []
    for h in range(layer.heads):
        cols = slice(h * e, (h + 1) * e)
        weights = torch.softmax(q[:, cols] @ k[:, cols].t() / math.sqrt(e), dim=1)  # [L, L]
        heads.append(weights @ v[:, cols])
    return torch.cat(heads, 1) @ layer.to_out.weight.t() + layer.to_out.bias


@pytest.mark.parametrize("axis", ["row", "column"])
def test_axial_attention_equals_attention_within_each_row_or_column(axis):
    torch.manual_seed(0)
    layer = AxialAttention(dim=8, heads=2, axis=axis)
    x = torch.randn(2, 8, 3, 5)  # [N, D, H, W]
    out = layer(x)
    assert out.shape == x.shape
    expected = torch.empty_like(x)
    for n in range(2):
        if axis == "row":
            for r in range(3):
                expected[n, :, r, :] = reference_attention(layer, x[n, :, r, :].t()).t()
        else:
            for c in range(5):
                expected[n, :, :, c] = reference_attention(layer, x[n, :, :, c].t()).t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_row_attention_does_not_mix_rows():
    torch.manual_seed(0)
    layer = AxialAttention(dim=8, heads=4, axis="row")
    x = torch.randn(1, 8, 4, 4)
    y = x.clone()
    y[:, :, 0] += 1.0  # change row 0 only
    a, b = layer(x), layer(y)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])
    torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:])


def test_twin_block_is_the_gated_sum_and_starts_as_the_identity():
    torch.manual_seed(0)
    block = TwinBlock(dim=8, heads=2)
    x = torch.randn(2, 8, 4, 6)
    torch.testing.assert_close(block(x), x)  # every ReZero gate starts at 0
    transformer = TwinTransformer(dim=8, depth=3, heads=2)
    torch.testing.assert_close(transformer(x), x)
    with torch.no_grad():
        for gate, value in zip((block.column, block.row, block.ff1, block.ff2), (0.5, -0.3, 0.2, 0.7), strict=True):
            gate.gate.fill_(value)
    mid = x + 0.5 * block.column.fn(x) - 0.3 * block.row.fn(x)
    expected = mid + 0.2 * block.ff1.fn(mid) + 0.7 * block.ff2.fn(mid)
    torch.testing.assert_close(block(x), expected)


def test_heads_shapes_and_the_mask_branch_reads_the_transformed_p5_without_coordinates():
    cfg, model = tiny("sotr")
    images, pixel_mask, _ = batch()
    heads = model._heads(images, pixel_mask)
    t = sum(s * s for s in cfg.model.sotr.grids)  # 144 + 100 + 64 + 36 + 16
    assert heads["cate"].shape == (2, t, 2) and heads["kernels"].shape == (2, t, 32)
    assert heads["mask_feats"].shape == (2, 32, 16, 16)
    assert model.mask_features.levels[3][0][0].in_channels == cfg.model.sotr.fpn_channels  # no +2
    assert not hasattr(model, "kernel_tower")
    # The transformer is shared by the grids and the mask branch: gradient reaches it from both.
    with torch.no_grad():
        for p in model.transformer.parameters():
            if p.ndim == 0:
                p.fill_(0.1)
    attention = model.transformer.blocks[0].row.fn.to_q.weight
    (g_mask,) = torch.autograd.grad(model._heads(images, pixel_mask)["mask_feats"].sum(), [attention])
    assert g_mask.abs().sum() > 0


def test_positive_cells_are_the_queries():
    """Every positive cell of `solo_targets` gives one query: its kernel, matched to its instance."""
    cfg, model = tiny("sotr")
    images, pixel_mask, targets = batch()
    out = model(images, pixel_mask, targets)
    c = cfg.model.sotr
    for i, t in enumerate(targets):
        cells = torch.cat(solo_targets(t["boxes"], t["masks"], (64, 64), c.grids, c.scale_ranges, c.sigma))
        pos = (cells >= 0).nonzero()[:, 0]
        assert torch.equal(out.instances[i], cells[pos])
        torch.testing.assert_close(out.queries[i], out.head["kernels"][i, pos])


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model.sotr.heads: must divide model.sotr.fpn_channels \(64\)"):
        load_config(None, ["model.type=sotr", "model.sotr.fpn_channels=64", "model.sotr.heads=5"])
    with pytest.raises(ValueError, match="model.sotr.depth: must be >= 1"):
        load_config(None, ["model.type=sotr", "model.sotr.depth=0"])
    with pytest.raises(ValueError, match="model.sotr.kernel_channels: must be a multiple of 32"):
        load_config(None, ["model.type=sotr", "model.sotr.kernel_channels=48"])
