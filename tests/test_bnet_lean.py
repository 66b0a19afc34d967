"BNET's memory-lean training path against plain `F.batch_norm` + `F.conv{1,2,3}d`, and its fallbacks."
import pytest, torch, torch.nn.functional as F
from torch import nn
from bnet_fastai.layers import BNET
from _bnet_ref import is_lean

convs = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
sizes = {1: (4, 5, 11), 2: (3, 5, 9, 8), 3: (2, 5, 7, 6, 7)}

def random_bnet(nf, ks, ndim, lean=True, **kw):
    m = BNET(nf, ks=ks, ndim=ndim, lean=lean, **kw)
    with torch.no_grad(): m.conv.weight.normal_(); m.conv.bias.normal_()
    return m

def plain_train(x, w, b, rm, rv, momentum, eps):
    "BNET written out in train mode: batch-stat batch_norm without affine (updating rm/rv), then a depthwise conv."
    y = F.batch_norm(x, rm, rv, training=True, momentum=momentum, eps=eps)
    return convs[x.dim()-2](y, w, b, padding=w.shape[-1]//2, groups=x.shape[1])

def grads(y, ins, g): return torch.autograd.grad(y, ins, g)

@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('ks', [1, 3, 5, 7])
def test_lean_matches_plain_maths(ndim, ks):
    "Output, grads of x/weight/bias and running stats over three steps, with borders everywhere (k=7 spans whole axes)."
    m = random_bnet(5, ks, ndim)
    rm, rv = torch.zeros(5), torch.ones(5)
    for _ in range(3):
        x = (torch.randn(*sizes[ndim]) * 2 + 3).requires_grad_()
        w, b = m.conv.weight, m.conv.bias
        y = m(x)
        assert is_lean(y)
        ref = plain_train(x, w, b, rm, rv, m.bn.momentum, m.bn.eps)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        for got, exp in zip(grads(y, (x, w, b), g), grads(ref, (x, w, b), g)):
            torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bn.running_mean, rm)
    torch.testing.assert_close(m.bn.running_var, rv)
    assert m.bn.num_batches_tracked.item() == 3

def test_flat_input_ndim1():
    m = random_bnet(6, 3, 1)
    x = torch.randn(8, 6, requires_grad=True)
    y = m(x)
    assert is_lean(y) and y.shape == (8, 6)
    ref = plain_train(x[..., None], m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps)[..., 0]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(y, (x,), torch.ones_like(y))[0], grads(ref, (x,), torch.ones_like(y))[0], atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('momentum,track', [(None, True), (0.3, True), (0.1, False)])
def test_running_stats_bookkeeping_like_batchnorm(momentum, track):
    "momentum=None is BN's cumulative average; without running stats nothing is tracked and batch stats are used in eval too."
    m = random_bnet(4, 3, 2, momentum=momentum)
    bn = nn.BatchNorm2d(4, momentum=momentum, affine=False, track_running_stats=track)
    if not track: m.bn = nn.BatchNorm2d(4, momentum=momentum, affine=False, track_running_stats=False)
    for i in range(4):
        x = torch.randn(3, 4, 5, 5) * (i + 1) + i
        ref = F.conv2d(bn(x), m.conv.weight, m.conv.bias, padding=1, groups=4)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    if track:
        torch.testing.assert_close(m.bn.running_mean, bn.running_mean)
        torch.testing.assert_close(m.bn.running_var, bn.running_var)
        assert m.bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4
    m.eval(); bn.eval()
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = m(x)
    assert is_lean(y) == (not track) # eval with running stats is the plain path; without them BN still uses batch stats
    torch.testing.assert_close(y, F.conv2d(bn(x), m.conv.weight, m.conv.bias, padding=1, groups=4), atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('ratio', [1., 10., 100., 1000.])
def test_large_channel_means(ratio):
    "|μ|/σ up to 1e3: lean equals plain in fp32, and its error against a float64 reference is no worse than plain's."
    C = 6
    m = random_bnet(C, 3, 2)
    mu = torch.randn(C).sign() * ratio * torch.linspace(0.5, 1, C)
    x = (torch.randn(8, C, 10, 10) + mu.view(1, C, 1, 1)).requires_grad_()
    y = m(x); assert is_lean(y)
    ref = plain_train(x, m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, m.conv.weight, m.conv.bias))
    ref64 = plain_train(x64, w64, b64, None, None, 0.1, m.bn.eps)
    err_lean, err_plain = (y.double() - ref64).abs().max().item(), (ref.double() - ref64).abs().max().item()
    assert err_lean <= 2 * err_plain + 1e-5, (err_lean, err_plain)
    torch.testing.assert_close(y, ref, atol=1e-5 * ratio, rtol=1e-5)
    g = torch.randn_like(y)
    g_lean, g_plain = grads(y, (x, m.conv.weight, m.conv.bias), g), grads(ref, (x, m.conv.weight, m.conv.bias), g)
    g64 = grads(ref64, (x64, w64, b64), g.double())
    for gl, gp, gr in zip(g_lean, g_plain, g64):
        el, ep = (gl.double() - gr).abs().max().item(), (gp.double() - gr).abs().max().item()
        assert el <= 2 * ep + 1e-5 * gr.abs().max().item(), (el, ep)

@pytest.mark.parametrize('ndim', [1, 2, 3])
def test_gradcheck_and_double_backward(ndim):
    m = random_bnet(2, 3, ndim).double()
    x = torch.randn(3, 2, *[3]*ndim, dtype=torch.double, requires_grad=True)
    w, b = m.conv.weight.detach().clone().requires_grad_(), m.conv.bias.detach().clone().requires_grad_()
    f = lambda x, w, b: torch.func.functional_call(m, {'conv.weight': w, 'conv.bias': b}, (x,))
    assert is_lean(f(x, w, b))
    assert torch.autograd.gradcheck(f, (x, w, b))
    # create_graph=True (Hessian-vector products) takes the differentiable recompute
    if ndim < 3: assert torch.autograd.gradgradcheck(f, (x, w, b))

def saved_storages(m, x):
    "Distinct non-parameter storages autograd saves for one forward of `m`, as (data_ptr, nbytes)."
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params: seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): m(x)
    return seen

def test_lean_saves_only_the_input():
    m = random_bnet(16, 3, 2)
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    big = lambda d: {p: n for p, n in d.items() if n >= x.nbytes}
    assert big(saved_storages(m, x)) == {x.untyped_storage().data_ptr(): x.nbytes}
    m.lean = False
    plain = big(saved_storages(m, x))
    assert len(plain) == 2 and x.untyped_storage().data_ptr() in plain # the input and the normalised tensor

def test_frozen_parts():
    "Only the input, or only the conv, needing grads."
    m = random_bnet(4, 5, 2)
    x = torch.randn(3, 4, 6, 6)
    y = m(x); assert is_lean(y)
    gw = grads(y, (m.conv.weight,), torch.ones_like(y))[0]
    ref = plain_train(x, m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps)
    torch.testing.assert_close(gw, grads(ref, (m.conv.weight,), torch.ones_like(y))[0], atol=1e-4, rtol=1e-4)
    m.conv.requires_grad_(False)
    xr = x.clone().requires_grad_()
    y = m(xr); assert is_lean(y)
    ref = plain_train(xr, m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps)
    torch.testing.assert_close(grads(y, (xr,), y.detach())[0], grads(ref, (xr,), y.detach())[0], atol=1e-4, rtol=1e-4)
    with torch.no_grad(): assert m(xr).grad_fn is None

def test_fallbacks_to_plain_path():
    m = random_bnet(4, 3, 2)
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    ref = plain_train(x, m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps)
    # SyncBatchNorm (after convert_sync_batchnorm) has its own forward: plain path, which it computes (no process
    # group: SyncBatchNorm uses batch statistics like BatchNorm)
    ms = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    assert isinstance(ms.bn, nn.SyncBatchNorm) and ms.lean is True
    y = ms(x)
    assert not is_lean(y); torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for a, e in zip(grads(y, (x, m.conv.weight), g), grads(ref, (x, m.conv.weight), g)): torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    m = random_bnet(4, 3, 2)
    ref = plain_train(x, m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps)
    # lean=False: plain path
    m.lean = False; y = m(x)
    assert not is_lean(y); torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lean must be True, False or None, got lean='yes'"): BNET(4, lean='yes')

def test_default_path_is_a_setting_read_at_build():
    "`defaults.bnet_lean` (fastai's `defaults`) and `lean_bnets()` choose the path that runs, also through a star import."
    ns = {}
    exec('from bnet_fastai.layers import *', ns)
    from fastai.vision.all import defaults
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    old = defaults.bnet_lean
    assert old is None # the default: lean unless autocast is on
    try:
        for flag in (True, False, None):
            defaults.bnet_lean = flag
            m = ns['BNET'](4)
            assert m.lean is flag and is_lean(m(x)) is (flag is not False)
        with ns['lean_bnets'](True): inside = ns['BNET'](4)
        with ns['lean_bnets'](False): plain = ns['BNET'](4)
        assert defaults.bnet_lean is None # restored after the block
        assert is_lean(inside(x)) and not is_lean(plain(x)) and is_lean(ns['BNET'](4)(x))
        with pytest.raises(ValueError, match="lean must be True, False or None, got lean='yes'"):
            with ns['lean_bnets']('yes'): pass
        with pytest.raises(KeyError):
            with ns['lean_bnets'](False): raise KeyError('inside') # restored on error too
        assert defaults.bnet_lean is None
    finally: defaults.bnet_lean = old
    assert 'lean' not in repr(BNET(4)) and 'lean=False' in repr(BNET(4, lean=False))

def saved_count(m, x, cast=None):
    "How many tensors autograd saves for one forward of `m` (the lean path saves 5: x, weight, bias, mean, 1/σ)."
    n = []
    ctx = torch.autocast('cpu', dtype=cast) if cast else torch.autocast('cpu', enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(1) or t, lambda t: t), ctx: m(x)
    return len(n)

def test_default_is_lean_in_fp32_and_plain_under_autocast():
    "lean=None decides at each forward: fp32 takes the lean path, CPU bf16 autocast the plain one, as forced paths do."
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    counts = {lean: (saved_count(BNET(8, lean=lean), x), saved_count(BNET(8, lean=lean), x, torch.bfloat16))
              for lean in (None, True, False)}
    assert counts[True][0] != counts[False][0] and counts[True][1] != counts[False][1] # the counts tell the paths apart
    assert counts[None] == (counts[True][0], counts[False][1])
    m = BNET(8) # the same layer switches between steps
    assert (saved_count(m, x), saved_count(m, x, torch.bfloat16), saved_count(m, x)) == (counts[True][0], counts[False][1], counts[True][0])

def test_fx_trace_takes_the_plain_path():
    "torch.fx.symbolic_trace of a model of lean BNETs in train mode records bn then conv, and computes what the model does."
    from bnet_fastai.models.xresnet import xresnet18
    torch.manual_seed(0)
    for lean in (True, None):
        model = xresnet18(n_out=3, norm='bnet').train()
        for l in model.modules():
            if isinstance(l, BNET): l.lean = lean
        gm = torch.fx.symbolic_trace(model)
        assert not any(isinstance(mod, BNET) for mod in gm.modules()) # traced through: its bn and conv are leaves
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        y, yt = model(x), gm(x)
        assert is_lean(y) and not is_lean(yt)
        torch.testing.assert_close(yt, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads(yt, (x,), torch.ones_like(yt))[0], grads(y, (x,), torch.ones_like(y))[0], atol=1e-5, rtol=1e-4)

def test_half_model_with_fp32_statistics(monkeypatch):
    "A model cast to bf16 without autocast, with BN statistics in fp32 as CUDA's kernel returns them for half input."
    torch.manual_seed(0)
    m = random_bnet(6, 3, 2).bfloat16()
    x = torch.randn(4, 6, 8, 8).bfloat16().requires_grad_()
    real = torch.native_batch_norm
    def fp32_stats(*args):
        out, mean, invstd = real(*args)
        return out, mean.float(), invstd.float()
    monkeypatch.setattr(torch, 'native_batch_norm', fp32_stats)
    y = m(x); assert is_lean(y)
    g = torch.randn_like(y)
    got = grads(y, (x, m.conv.weight, m.conv.bias), g)
    assert [t.dtype for t in got] == [torch.bfloat16]*3
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, m.conv.weight, m.conv.bias))
    ref = plain_train(x32, w32, b32, None, None, 0.1, m.bn.eps)
    for a, e in zip(got, grads(ref, (x32, w32, b32), g.float())):
        torch.testing.assert_close(a.float(), e, atol=0.03 * e.abs().max().item(), rtol=0.03)

# bf16 keeps 8 significant bits (relative rounding 2**-8 ≈ 0.4%); after a k-tap conv and BN's backward the
# error against fp32 stays within a few roundings of the largest value, so we allow 3% of it.
BF16_TOL = 0.03

def close_to(got, exp, tol=BF16_TOL):
    torch.testing.assert_close(got.float(), exp, atol=tol * exp.abs().max().item(), rtol=tol)

@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('lean', [True, False])
def test_bf16_autocast_against_fp32(ndim, lean):
    "Under bf16 autocast both paths (the lean one now runs there too) match an fp32 reference, in train and eval mode."
    torch.manual_seed(ndim)
    m = random_bnet(5, 3, ndim, lean=lean)
    ref_bn = getattr(nn, f'BatchNorm{ndim}d')(5, affine=False)
    w, b = m.conv.weight, m.conv.bias
    for _ in range(2):
        x = (torch.randn(*sizes[ndim]) * 2 + 3).requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16): y = m(x)
        assert is_lean(y) == lean and y.dtype == torch.bfloat16
        ref = convs[ndim](ref_bn(x), w, b, padding=1, groups=5)
        close_to(y, ref)
        g = torch.randn_like(ref)
        got = grads(y, (x, w, b), g.bfloat16())
        assert [t.dtype for t in got] == [torch.float32]*3 # grads come back in the parameters' and input's dtype
        for a, e in zip(got, grads(ref, (x, w, b), g)): close_to(a, e)
    torch.testing.assert_close(m.bn.running_mean, ref_bn.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(m.bn.running_var, ref_bn.running_var, atol=1e-3, rtol=1e-3)
    m.eval(); ref_bn.eval()
    x = torch.randn(*sizes[ndim]) * 2 + 3
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16): y = m(x)
    close_to(y, convs[ndim](ref_bn(x), w, b, padding=1, groups=5).detach())

def test_autocast_lean_equals_plain_and_saves_only_the_input():
    "Under autocast the lean path runs the plain path's kernels on the same casts, and keeps no x̂."
    m = random_bnet(16, 3, 2)
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x); m.lean = False; yp = m(x); m.lean = True
        big = lambda d: {p: n for p, n in d.items() if n >= x.nbytes // 2}
        assert big(saved_storages(m, x)) == {x.untyped_storage().data_ptr(): x.nbytes}
    assert is_lean(y) and not is_lean(yp)
    torch.testing.assert_close(y, yp, atol=0, rtol=0)
    g = torch.randn_like(y)
    for a, e in zip(grads(y, (x, m.conv.weight, m.conv.bias), g), grads(yp, (x, m.conv.weight, m.conv.bias), g)):
        close_to(a, e, tol=0.01)

def test_jit_script_trace_and_compile():
    from bnet_fastai.models.xresnet import xresnet18
    model = xresnet18(n_out=3, norm='bnet')
    for l in model.modules():
        if isinstance(l, BNET): l.lean = True
    sm = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval(); sm.eval()
    torch.testing.assert_close(sm(x), model(x), atol=1e-4, rtol=1e-4)
    m = random_bnet(4, 3, 2)
    xi = torch.randn(3, 4, 6, 6, requires_grad=True)
    tm = torch.jit.trace(m, (xi,), check_trace=False)
    torch.testing.assert_close(tm(xi), plain_train(xi, m.conv.weight, m.conv.bias, None, None, 0.1, m.bn.eps), atol=1e-5, rtol=1e-5)
    cm = torch.compile(random_bnet(4, 3, 2), backend='aot_eager')
    y = cm(xi); y.sum().backward()
    ref = plain_train(xi, cm.conv.weight, cm.conv.bias, None, None, 0.1, 1e-5)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
