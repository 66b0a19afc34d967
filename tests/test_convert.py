"convert_to_bnet keeps the function of fastai, torchvision and timm models, and of a fastai vision_learner."
import pytest, torch, timm, torchvision, warnings
import torch.nn.functional as F
from torch import nn
from copy import deepcopy
from fastai.vision.all import vision_learner, resnet34, accuracy, CrossEntropyLossFlat
from fastai.vision.models import xresnet as fx
from bnet_fastai.layers import BNET
from bnet_fastai.convert import convert_to_bnet, ConvertReport
from bnet_fastai.placement import branch_last_norms
from _digits import digits_dls
from _bnet_ref import check_bnets_match_reference, off_centre, KernelWatch

def randomise_norms(model, x, seed=0):
    "Trained-looking BatchNorms: random affines (small γ ending residual branches, as training leaves them), running stats from data."
    g = torch.Generator().manual_seed(seed)
    last = {id(m) for m in branch_last_norms(model)}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.weight.copy_((torch.rand(c, generator=g) + 0.5) * (0.2 if id(m) in last else 1.))
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.reset_running_stats(); m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for xb in x.split(len(x) // 2): model(xb)
        for m in bns: m.momentum = 0.1
    return model.eval()

def n_bn(model): return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(p, BNET)
                            for p in model.modules() for m in p.children())

def _fwd(model, x, train, seed=1):
    model.train(train); torch.manual_seed(seed)  # the same dropout masks for both models
    with torch.no_grad(): return model(x)

def check_same_function(orig, new, x, atol=1e-5, max_out=50):
    """`new` computes what `orig` computes, in eval and train mode.
    float64: equal to 1e-10, so the maths is the same. float32: within `atol`, or, where larger, within the two
    models' own float32 rounding errors added up (each one's distance from its float64 self): two float32 evaluations
    of one exact function cannot be asked to agree more closely than that."""
    o64, n64 = deepcopy(orig).double(), deepcopy(new).double()
    for train in (False, True):
        y64 = _fwd(o64, x.double(), train)
        n64y = _fwd(n64, x.double(), train)
        torch.testing.assert_close(n64y, y64, atol=1e-10, rtol=0)
        yo, yn = _fwd(orig, x, train), _fwd(new, x, train)
        assert yo.abs().max() < max_out  # a realistic output scale, not a blown-up network
        own = (yo.double() - y64).abs().max().item() + (yn.double() - n64y).abs().max().item()
        torch.testing.assert_close(yn, yo, atol=max(atol, own), rtol=0)
    for name, m in new.named_modules():  # running stats moved the same way
        if isinstance(m, BNET): torch.testing.assert_close(m.bn.running_var, orig.get_submodule(name).running_var)

models = dict(fastai_xresnet50=lambda: fx.xresnet50(n_out=10),
              torchvision_resnet18=lambda: torchvision.models.resnet18(weights=None),
              timm_resnet26d=lambda: timm.create_model('resnet26d', pretrained=False))

@pytest.mark.parametrize('name,at', [('fastai_xresnet50', 'all'), ('torchvision_resnet18', 'all'), ('timm_resnet26d', 'all'),
                                     ('fastai_xresnet50', 'last'), ('torchvision_resnet18', 'last')])
def test_convert_keeps_function(name, at):
    "The converted model computes what the original computes: float64 to 1e-10, fp32 within its rounding."
    make = models[name]
    x = torch.randn(8, 3, 48, 48)
    orig = randomise_norms(make(), x)
    nbn = n_bn(orig)
    new = convert_to_bnet(orig, bnet_at=at)
    rep = new.convert_report
    n_last = len(branch_last_norms(orig))
    bnets = [m for m in new.modules() if isinstance(m, BNET)]
    assert len(bnets) == rep.n_converted == (nbn if at == 'all' else n_last)
    assert n_bn(new) == nbn - rep.n_converted and not rep.left
    assert rep.params_added == sum(b.nf * (b.ks**2 - 1) for b in bnets)
    assert n_bn(orig) == nbn  # the original is untouched
    check_same_function(orig, new, x[:4])

@pytest.mark.slow
def test_vision_learner_convert_split_and_fit():
    dls = digits_dls(size=32, n=900, bs=64, n_valid=200)
    torch.manual_seed(0) # the init, whatever ran before in this process
    learn = vision_learner(dls, resnet34, pretrained=False, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    xb, _ = dls.one_batch()
    randomise_norms(learn.model, xb)
    orig = learn.model
    learn.model = convert_to_bnet(learn.model)
    rep = learn.model.convert_report
    assert rep.n_converted == n_bn(orig) and n_bn(learn.model) == 0  # head BatchNorm1d included
    kw = KernelWatch(learn.model)
    assert all(not off_centre(w).any() for w in kw.init)  # a converted BatchNorm: only the centre tap
    # an untrained resnet34 with fastai's head gives logits up to 36-72 (seeds 0-7) in eval mode: a blown-up one gives far more
    check_same_function(orig, learn.model, F.interpolate(xb[:16], size=64, mode='bilinear'), max_out=200)
    # fastai's splitter still finds body and head, and covers every parameter once.
    groups = learn.splitter(learn.model)
    assert len(groups) == 3
    ps = [p for g in groups for p in g]
    assert len(ps) == len(list(learn.model.parameters())) and len({id(p) for p in ps}) == len(ps)
    assert all(any(isinstance(m, BNET) for m in g.modules()) for g in (learn.model[0][:6], learn.model[0][6:], learn.model[1:]))
    # Frozen: the body's convs stop training but its BNETs, as norms, keep training.
    learn.freeze()
    body = learn.model[0]
    assert not body[0].weight.requires_grad
    assert all(p.requires_grad for m in body.modules() if isinstance(m, BNET) for p in m.parameters())
    learn.unfreeze()
    with kw: learn.fit_one_cycle(1, 1e-3)  # fp32
    # Fine-tuning trained every BNET's kernel: it moved, and grew off-centre taps wherever the map is larger than 1×1
    # (on a 1×1 map, like the head's BatchNorm1d turned BNET, they only ever see padding).
    n = kw.check()
    assert sum(s > 1 for s in kw.sizes.values()) > n // 2
    assert check_bnets_match_reference(learn.model, xb[:8]) == n

def random_norm_stats(model, seed=0):
    "Every BatchNorm gets random running statistics and affine, as a trained network has."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm): continue
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2); m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5); m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model

def n_any_bn(model): return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

@pytest.mark.parametrize('name', ['mobilenetv3_large_100', 'regnety_002'])
def test_convert_timm_norm_act(name):
    "timm's BatchNormAct2d (BatchNorm, dropout, activation in one layer) converts exactly, and fuse_bnet folds the result (fp32)."
    from timm.layers import BatchNormAct2d
    from bnet_fastai.deploy import fuse_bnet
    # Dropout and drop-path on, so train mode exercises the seeded random layers too.
    orig = random_norm_stats(timm.create_model(name, pretrained=False, drop_rate=0.2, drop_path_rate=0.1))
    nacts = sum(isinstance(m, BatchNormAct2d) for m in orig.modules())
    assert nacts > 0 and nacts == n_any_bn(orig)
    new = convert_to_bnet(orig)
    rep = new.convert_report
    assert rep.n_converted == nacts and not rep.left and n_bn(new) == 0
    # Each norm becomes its BNET followed by the layer's own drop and activation.
    acts = [(type(new.get_submodule(n)[2]), type(orig.get_submodule(n).act)) for n in rep.converted]
    assert all(a == b for a, b in acts) and any(a is not nn.Identity for a, _ in acts)
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        yo, yn = _fwd(orig, x, train), _fwd(new, x, train)
        torch.testing.assert_close(yn, yo, rtol=1e-5, atol=1e-5 * yo.abs().max().item())
    fused = fuse_bnet(new.eval())
    frep = fused.fuse_report
    assert len(frep.folded) == nacts and not frep.left and n_any_bn(fused) == 0  # BNET's inner BatchNorms too
    yo, yf = _fwd(orig, x, False), _fwd(fused, x, False)
    torch.testing.assert_close(yf, yo, rtol=1e-4, atol=1e-4 * yo.abs().max().item())

class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x): return 2 * super().forward(x)

def test_convert_warns_when_nothing_converts():
    with pytest.warns(UserWarning, match="no BatchNorm found; the model has no norm layers"):
        convert_to_bnet(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.warns(UserWarning, match="_ScaledBN has its own forward"): convert_to_bnet(nn.Sequential(nn.Conv2d(3, 8, 3), _ScaledBN(8)))
    with warnings.catch_warnings():  # a model with something to convert stays quiet
        warnings.simplefilter('error'); convert_to_bnet(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), _ScaledBN(8)))

def test_convert_names_the_norms_it_does_not_replace():
    "A model without BatchNorm is told which norms it has, counted by class; BNETs are named only where there are some."
    cn = timm.create_model('convnext_nano', pretrained=False)
    n_ln = sum(type(m) is timm.layers.LayerNorm2d for m in cn.modules())
    assert n_ln > 0 and n_any_bn(cn) == 0
    with pytest.warns(UserWarning, match=rf"no BatchNorm found; found {n_ln} LayerNorm2d, which BNET does not replace$"):
        assert convert_to_bnet(cn).convert_report.other_norms == {'LayerNorm2d': n_ln}
    # A model class named like a norm (NormXResNet) holds norms but is not one; its existing BNETs are counted once each.
    bn = convert_to_bnet(fx.xresnet18(n_out=10))
    with pytest.warns(UserWarning, match=rf"no BatchNorm found; found {len(bn.convert_report.converted)} BNET already$"):
        convert_to_bnet(bn)
    # Where some BatchNorms convert, the report still lists the other norms.
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8), nn.GroupNorm(4, 8))
    rep = convert_to_bnet(m).convert_report
    assert rep.converted == ['1'] and rep.other_norms == {'GroupNorm': 2, 'InstanceNorm2d': 1}
    assert 'found 2 GroupNorm and 1 InstanceNorm2d, which BNET does not replace' in repr(rep)

def test_not_a_model_raises_type_error():
    from fastai.vision.all import Learner
    from bnet_fastai.deploy import fuse_bnet, export_onnx
    for f in (convert_to_bnet, fuse_bnet, export_onnx):
        args = (torch.randn(1, 3, 8, 8),) if f is export_onnx else ()
        with pytest.raises(TypeError, match=rf"{f.__name__} expects a model \(a torch nn.Module\), got str; build the model first, "
                                            r"e.g. timm.create_model\('resnet50'\)"):
            f('resnet50', *args)
        with pytest.raises(TypeError, match=rf"got dict$"): f({}, *args)
    learn = Learner(digits_dls(size=8, n=64, bs=32, n_valid=32), fx.xresnet18(n_out=10), loss_func=CrossEntropyLossFlat())
    with pytest.raises(TypeError, match=r"got Learner; pass its model: convert_to_bnet\(learn.model\)"): convert_to_bnet(learn)
    with pytest.raises(TypeError, match=r"x \(a torch.Tensor\), got list"): export_onnx(nn.Conv2d(3, 3, 1).eval(), [[1.]])

def test_returns_model_and_legacy_tuple_warns_once(monkeypatch):
    "Both converters return the model, with the report on it; `legacy_tuple=True` returns the old tuple, warning once per function."
    from bnet_fastai import convert
    from bnet_fastai.deploy import fuse_bnet, FuseReport
    monkeypatch.setattr(convert, '_warned_tuple', set())
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    new = convert_to_bnet(m)
    assert isinstance(new, nn.Sequential) and isinstance(new.convert_report, ConvertReport) and new.convert_report.converted == ['1']
    fused = fuse_bnet(new.eval())
    assert isinstance(fused, nn.Sequential) and isinstance(fused.fuse_report, FuseReport) and len(fused.fuse_report.folded) == 1
    for f, attr, src in ((convert_to_bnet, 'convert_report', m), (fuse_bnet, 'fuse_report', new.eval())):
        with pytest.warns(DeprecationWarning, match=rf"{f.__name__}\(\.\.\., legacy_tuple=True\) is deprecated.*model\.{attr}") as ws:
            res = f(src, legacy_tuple=True)
        assert len(ws) == 1 and ws[0].filename == __file__  # points at the caller
        assert isinstance(res, tuple) and res[1] is getattr(res[0], attr)
        with warnings.catch_warnings():
            warnings.simplefilter('error', DeprecationWarning); f(src, legacy_tuple=True)  # once only
