"""The feature maps and the state compression, by hand: the op's three forms share them, so only these
tests pin their maths."""
import torch
import torch.nn.functional as F

from bsbr.layers.feature_maps import FeatureMap, HeadwiseLinear, StateCompression


def test_hedgehog_is_the_softmax_of_xw_and_of_minus_xw():
    torch.manual_seed(0)
    fm = FeatureMap("hedgehog", heads=2, head_dim=3)
    with torch.no_grad():
        fm.proj.weight.copy_(torch.randn(2, 3, 3))
    x = torch.randn(1, 2, 4, 3)
    y = torch.stack([x[:, h] @ fm.proj.weight[h] for h in range(2)], 1)  # each head its own W
    expected = torch.cat([F.softmax(y, -1), F.softmax(-y, -1)], -1)
    torch.testing.assert_close(fm(x), expected)
    assert fm.out_dim == 6 and fm.nonnegative
    # each half sums to 1 per token: the normalized form's denominator is never 0
    torch.testing.assert_close(fm(x)[..., :3].sum(-1), torch.ones(1, 2, 4))


def test_headwise_linear_maps_rows_by_each_heads_own_matrix():
    lin = HeadwiseLinear(heads=2, d_in=2, d_out=3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).view(2, 2, 3))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2).expand(1, 2, 2, 2)
    # the identity rows read back each head's matrix (d_in x d_out), not its transpose
    torch.testing.assert_close(lin(x)[0], lin.weight)
    assert lin(None) is lin.weight
    torch.testing.assert_close(HeadwiseLinear(1, 3, 3).weight[0], torch.eye(3))


def test_elu_map_is_elu_plus_one():
    x = torch.tensor([-30.0, -1.0, 0.0, 2.0])
    torch.testing.assert_close(FeatureMap("elu", 1, 4)(x), F.elu(x) + 1)
    assert FeatureMap("elu", 1, 4)(x).min() >= 0 and FeatureMap("identity", 1, 4)(x) is x


def test_state_compression_starts_as_average_pooling_and_stays_nonnegative():
    c = StateCompression(feature_dim=6, factor=3)
    f = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]])
    torch.testing.assert_close(c(f), torch.tensor([[2.0, 20.0]]))  # means of 3 consecutive features
    nn_c = StateCompression(6, 3, nonnegative=True)
    with torch.no_grad():
        nn_c.proj.sub_(1.0)  # every entry below 0: clamped, so positive features map to 0, never below
        c.proj.sub_(1.0)
    assert (nn_c(f) == 0).all() and (c(f) < 0).all()
