import torch
import torch.nn.functional as F

from iuq.core.decoders import DotProductDecoder, DynamicConvDecoder
from iuq.core.sampling import grid_xy


def test_dot_product_flat_equals_dense_einsum():
    torch.manual_seed(0)
    q, fmap = torch.randn(5, 16), torch.randn(16, 7, 9)
    flat = DotProductDecoder()(q, fmap.flatten(1).t())  # [5, 63]
    dense = torch.einsum("qd,dhw->qhw", q, fmap)
    torch.testing.assert_close(flat, dense.flatten(1))


def test_dynamic_conv_has_169_params_and_equals_dense_convolution():
    dec = DynamicConvDecoder(in_channels=8, widths=(8, 8, 1), soi=0.25)
    assert dec.num_query_params() == 169
    torch.manual_seed(0)
    nq, h, w = 3, 6, 10
    params = torch.randn(nq, 169, dtype=torch.float64)
    fmap = torch.randn(8, h, w, dtype=torch.float64)
    qxy = torch.rand(nq, 2, dtype=torch.float64)
    flat = dec(params, fmap.flatten(1).t(), grid_xy(h, w).double(), qxy)  # [3, 60]
    xy = grid_xy(h, w).double().t().reshape(2, h, w)  # [2, h, w]
    for n in range(nq):
        rel = (qxy[n][:, None, None] - xy) / 0.25  # [2, h, w]
        x = torch.cat([rel, fmap])[None]  # [1, 10, h, w]
        for k, (wt, b) in enumerate(dec.split_params(params[n : n + 1])):
            x = F.conv2d(x, wt[0][:, :, None, None], b[0])
            if k < 2:
                x = F.relu(x)
        torch.testing.assert_close(flat[n], x.flatten())


def test_dynamic_conv_per_query_size_of_interest():
    dec = DynamicConvDecoder()
    params, pix, pxy = torch.randn(2, 169), torch.randn(4, 8), torch.rand(4, 2)
    qxy = torch.rand(2, 2)
    a = dec(params, pix, pxy, torch.cat([qxy, torch.full((2, 1), 0.5)], 1))
    dec.soi = 0.5
    torch.testing.assert_close(a, dec(params, pix, pxy, qxy))
