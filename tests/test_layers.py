"BNET against plain torch maths, and its conversion from a trained BatchNorm."
import pytest, torch, torch.nn.functional as F
from torch import nn
from bnet_fastai.layers import BNET

def plain_bnet(x, bn, conv_w, conv_b, training):
    "BNET written out: batch_norm without affine, then a depthwise conv."
    y = F.batch_norm(x, None if training else bn.running_mean, None if training else bn.running_var,
                     training=training, eps=bn.eps)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(y, conv_w, conv_b, padding=conv_w.shape[-1]//2, groups=x.shape[1])

@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('ks', [1, 3, 5])
def test_bnet_matches_plain_maths(ndim, ks):
    m = BNET(6, ks=ks, ndim=ndim)
    with torch.no_grad(): m.conv.weight.normal_(); m.conv.bias.normal_()
    x = torch.randn(4, 6, *[7]*ndim) * 2 + 3
    for training in (True, False):
        m.train(training)
        ref = plain_bnet(x, m.bn, m.conv.weight, m.conv.bias, training)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('ndim', [1, 2, 3])
def test_fresh_bnet_is_batchnorm_without_affine(ndim):
    m = BNET(5, ndim=ndim)
    x = torch.randn(3, 5, *[6]*ndim) * 4 - 2
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, training=True), atol=1e-6, rtol=0)
    m.eval()
    torch.testing.assert_close(m(x), F.batch_norm(x, m.bn.running_mean, m.bn.running_var, training=False), atol=1e-6, rtol=0)

def test_zero_init_outputs_zero():
    m = BNET(7, ks=5, zero=True)
    assert m(torch.randn(2, 7, 9, 9)).abs().max() == 0

@pytest.mark.parametrize('bn_cls,shape', [(nn.BatchNorm1d, (8, 10)), (nn.BatchNorm1d, (8, 10, 12)),
                                          (nn.BatchNorm2d, (8, 10, 6, 6)), (nn.BatchNorm3d, (8, 10, 3, 4, 5))])
def test_from_bn_reproduces_trained_bn(bn_cls, shape):
    bn = bn_cls(10, momentum=0.3, eps=1e-3)
    with torch.no_grad():
        bn.weight.normal_(); bn.bias.normal_(); bn.running_mean.normal_(); bn.running_var.uniform_(0.2, 3)
    m = BNET.from_bn(bn, ks=3)
    x = torch.randn(*shape) * 3 + 1
    bn.eval(); m.eval()
    torch.testing.assert_close(m(x), bn(x), atol=1e-5, rtol=1e-5)
    bn.train(); m.train()
    torch.testing.assert_close(m(x), bn(x), atol=1e-5, rtol=1e-5)
    # the running statistics are updated identically in train mode
    torch.testing.assert_close(m.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(m.bn.running_var, bn.running_var)
    assert (m.bn.eps, m.bn.momentum) == (bn.eps, bn.momentum)

def test_from_bn_without_affine_keeps_dtype():
    "A BN without γ/β: the BNET follows its running stats' dtype (float64 stands for a half or CUDA model)."
    bn = nn.BatchNorm2d(5, affine=False).double()
    with torch.no_grad(): bn.running_mean.normal_(); bn.running_var.uniform_(0.5, 2)
    m = BNET.from_bn(bn)
    assert {t.dtype for t in (*m.parameters(), m.bn.running_mean, m.bn.running_var)} == {torch.float64}
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), bn(x))
    m.eval(); bn.eval()
    torch.testing.assert_close(m(x), bn(x))

def test_from_syncbn_needs_ndim():
    sbn = nn.SyncBatchNorm(4)
    with pytest.raises(ValueError, match='ndim'): BNET.from_bn(sbn)
    assert BNET.from_bn(sbn, ndim=2).ndim == 2

@pytest.mark.parametrize('ndim', [1, 2, 3])
def test_gradcheck(ndim):
    m = BNET(3, ndim=ndim).double()
    with torch.no_grad(): m.conv.weight.normal_(); m.conv.bias.normal_()
    x = torch.randn(3, 3, *[4]*ndim, dtype=torch.double, requires_grad=True)
    w, b = m.conv.weight.detach().clone().requires_grad_(), m.conv.bias.detach().clone().requires_grad_()
    f = lambda x, w, b: torch.func.functional_call(m, {'conv.weight': w, 'conv.bias': b}, (x,))
    assert torch.autograd.gradcheck(f, (x, w, b))

@pytest.mark.parametrize('kw,match', [(dict(ks=2), 'odd'), (dict(ks=0), 'odd'), (dict(ks=3.0), 'odd'),
                                      (dict(ndim=4), 'ndim'), (dict(nf=0), 'nf')])
def test_bad_arguments(kw, match):
    args = dict(nf=4); args.update(kw)
    with pytest.raises(ValueError, match=match): BNET(**args)
