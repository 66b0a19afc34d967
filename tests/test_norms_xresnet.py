"The norm registry and the XResNet builders, checked against fastai's own models."
import copy, json, subprocess, sys, textwrap
import pytest, torch
from torch import nn
import fastai.vision.models.xresnet as fx
from fastai.layers import ResBlock
import bnet_fastai  # applies the fastai patches
from bnet_fastai.layers import BNET
from bnet_fastai.norms import make_norm, norm_registry, get_norm
from bnet_fastai.registry import Registry
from bnet_fastai.activations import get_act, act_registry
from bnet_fastai.optimizers import get_opt, opt_registry
from bnet_fastai.models import xresnet as bx
from bnet_fastai.placement import branch_last_norms

FastaiXResNet = fx.XResNet
n_params = lambda m: sum(p.numel() for p in m.parameters())
FASTAI_BUILDERS = {n for n in fx.__all__ if n.startswith('x') and callable(getattr(fx, n))}
BUILDERS = sorted(FASTAI_BUILDERS)

def fastai_xresnet50(**kw): return FastaiXResNet(ResBlock, 4, [3, 4, 6, 3], **kw)

def test_every_fastai_builder_has_a_counterpart():
    "Each fastai builder has one of ours under the same name, which builds our class (fastai's stays fastai's)."
    assert FASTAI_BUILDERS <= set(bx.arch_registry)
    assert all(bx.arch_registry[n] is not getattr(fx, n) and getattr(bx, n) is bx.arch_registry[n] for n in FASTAI_BUILDERS)

def test_bn_is_fastais_model():
    torch.manual_seed(3); ours = bx.xresnet50(norm='bn', n_out=10)
    torch.manual_seed(3); ref = fastai_xresnet50(n_out=10)
    assert [(k, v.shape) for k, v in ours.named_parameters()] == [(k, v.shape) for k, v in ref.named_parameters()]
    x = torch.randn(2, 3, 64, 64)
    ours.eval(); ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    ours.train(); ref.train()
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)

@pytest.mark.parametrize('norm,k', [('bnet', 3), ('bnet5', 5), ('bnet7', 7)])
def test_bnet_param_count(norm, k):
    ref = fastai_xresnet50(n_out=10)
    m = bx.xresnet50(norm=norm, n_out=10)
    assert not any(isinstance(o, nn.BatchNorm2d) and o.affine for o in m.modules())
    bns = [o for o in ref.modules() if isinstance(o, nn.BatchNorm2d)]
    bnets = [o for o in m.modules() if isinstance(o, BNET)]
    assert len(bns) == len(bnets) and all(o.ks == k for o in bnets)
    assert n_params(m) == n_params(ref) + sum(o.num_features*k*k + o.num_features - 2*o.num_features for o in bns)

def test_bnet_at_last_is_authors_placement():
    m = bx.xresnet50(norm='bnet', bnet_at='last')
    bnets = [o for o in m.modules() if isinstance(o, BNET)]
    assert len(bnets) == 16
    assert all(isinstance(b, BNET) for b in branch_last_norms(m))
    # stem and identity path keep BN
    assert isinstance(m[0][1], nn.BatchNorm2d)

def _check_zero_init(m, x):
    outs = []
    hooks = [n.register_forward_hook(lambda mod, i, o: outs.append(o.detach().abs().max().item()))
             for n in branch_last_norms(m)]
    y = m(x)
    for h in hooks: h.remove()
    assert outs and max(outs) == 0
    return y

# One builder per block family at full size; the rest at a small width, which keeps the depth and the layout.
FULL = {'xresnet50', 'xse_resnet50', 'xse_resnext50'}
def _size(name):
    if name in FULL: return {}
    return dict(widen=0.5 if 'resnext' in name else 0.25, **({'groups': 1} if name == 'xsenet154' else {}))
def _combos(name):
    # xsenet154 is 91M parameters at full size: one small build covers its layout.
    return [('bnet', 'last')] if name == 'xsenet154' else [(n, a) for n in ('bn', 'bnet', 'bnet5') for a in ('all', 'last')]

@pytest.mark.parametrize('name', BUILDERS)
def test_builder_norm_matrix(name):
    "Every builder x norm x placement runs forward and backward; residual-last norms output 0 at init."
    x = torch.randn(2, 3, 64, 64)
    for norm, at in _combos(name):
        m = bx.arch_registry[name](n_out=7, norm=norm, bnet_at=at, **_size(name))
        assert isinstance(m, FastaiXResNet)
        y = _check_zero_init(m, x)
        assert y.shape == (2, 7)
        y.sum().backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        n_bnet = sum(isinstance(o, BNET) for o in m.modules())
        n_last = len(branch_last_norms(m))
        if norm == 'bn': assert n_bnet == 0
        elif at == 'last': assert n_bnet == n_last
        else: assert not any(isinstance(o, nn.BatchNorm2d) and o.affine for o in m.modules())

_fastai_before_and_after = textwrap.dedent("""
    import json
    import fastai.vision.models.xresnet as fx
    ns, cls = dict(vars(fx)), dict(vars(fx.XResNet))
    import bnet_fastai.all
    from bnet_fastai.fastai_patches import fastai_xsenet154
    changed = lambda old, new: sorted(n for n in old.keys() | new.keys() if old.get(n) is not new.get(n))
    print(json.dumps(dict(module=changed(ns, vars(fx)), xresnet=changed(cls, vars(fx.XResNet)),
                          xsenet154_fixed=fx.xsenet154 is fastai_xsenet154)))""")

def test_fastai_builders_unchanged_after_import():
    "Importing bnet_fastai leaves fastai's xresnet module and its `XResNet` class as they were (fastai's names, fastai's objects)."
    # Compared in a fresh interpreter, so the snapshot is taken before anything of bnet_fastai is imported.
    p = subprocess.run([sys.executable, '-c', _fastai_before_and_after], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.splitlines()[-1])
    # The one exception: fastai's broken `xsenet154`, replaced by the fixed one (03_fastai_patches).
    assert res['module'] == (['xsenet154'] if res['xsenet154_fixed'] else []), res
    assert res['xresnet'] == [], res
    with pytest.raises(TypeError, match='norm'): fx.xresnet50(norm='bnet', n_out=10)

def test_patches_idempotent():
    "Applying the patches again changes nothing: no second wrapper, no duplicate norm type, no second import hook."
    import fastai.torch_core, fastai.learner, fastai.callback.training
    from bnet_fastai.fastai_patches import apply_patches
    state = lambda: dict(fx=dict(vars(fx)), create_opt=fastai.learner.Learner.create_opt,
                         set_bn_eval=fastai.callback.training.set_bn_eval,
                         norm_types=tuple(fastai.torch_core.norm_types), meta_path=list(sys.meta_path))
    before = state()
    apply_patches(); apply_patches()
    after = state()
    assert fastai.torch_core.norm_types.count(BNET) == 1
    assert after['fx'].keys() == before['fx'].keys() and all(after['fx'][k] is v for k, v in before['fx'].items())
    assert {k: v for k, v in after.items() if k != 'fx'} == {k: v for k, v in before.items() if k != 'fx'}

@pytest.mark.parametrize('lean', [False, True])
def test_sync_batchnorm_conversion(lean):
    "After `convert_sync_batchnorm`, every BNET normalises through its SyncBatchNorm (the module DDP synchronises), in fp32."
    from bnet_fastai.layers import lean_bnets
    torch.manual_seed(0)
    with lean_bnets(lean): ref = bx.xresnet18(norm='bnet', n_out=5, widen=0.25)
    for b in ref.modules():  # a non-identity start, so the conv after the norm matters
        if isinstance(b, BNET): nn.init.normal_(b.conv.weight, std=0.3); nn.init.normal_(b.conv.bias, std=0.1)
    m = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    bnets = [o for o in m.modules() if isinstance(o, BNET)]
    assert bnets and all(isinstance(b.bn, nn.SyncBatchNorm) for b in bnets)
    calls = []
    hooks = [b.bn.register_forward_hook(lambda mod, i, o: calls.append(mod)) for b in bnets]
    x = torch.randn(4, 3, 16, 16)
    # One process and no process group: SyncBatchNorm computes BatchNorm's maths, so both models agree exactly.
    y, y_ref = m(x), ref(x)
    assert len(calls) == len(bnets), 'a BNET bypassed its SyncBatchNorm'
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward(); y_ref.sum().backward()
    for (n, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=n)
    for h in hooks: h.remove()

@pytest.mark.parametrize('lookup,registry,kind,near,meant', [
    (get_norm, norm_registry, 'norm', 'bnett', 'bnet'),
    (get_act, act_registry, 'activation', 'Mish', 'mish'),
    (bx.get_arch, bx.arch_registry, 'arch', 'xresnet19', 'xresnet18'),
    (get_opt, opt_registry, 'optimizer', 'rangr', 'ranger'),
])
def test_every_registry_answers_alike(lookup, registry, kind, near, meant):
    "Each registry's lookup refuses a near miss in the same words: the name, the closest valid one, every valid one."
    assert isinstance(registry, Registry) and isinstance(registry, dict) and registry.kind == kind
    with pytest.raises(ValueError) as e: lookup(near)
    assert str(e.value) == f"unknown {kind} {near!r}; did you mean {meant!r}? valid {kind}s: {', '.join(registry)} (or {registry.alt})"

@pytest.mark.parametrize('call,match', [
    (lambda: bx.xresnet18(norm='bnet4'), r"'bnet4'.*bn, bnet, bnet3, bnet5, bnet7, in, none"),
    (lambda: bx.xresnet18(norm='bogus'), r"'bogus'.*bn, bnet, bnet3, bnet5, bnet7, in, none"),
    (lambda: make_norm('bogus', 8), r"unknown norm 'bogus'; valid norms: bn, bnet"),
    (lambda: make_norm('bnet9', 8), r"'bnet9' \(for another kernel size pass `partial\(BNET, ks=9\)`\)"),
    (lambda: BNET(8, ks=2), r"ks=2.*odd|odd.*ks=2"),
    (lambda: bx.xresnet18(norm='bnet', bnet_at='middle'), r"'middle'.*'all', 'last'"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match): call()

def test_registry_names():
    assert list(norm_registry) == ['bn', 'bnet', 'bnet3', 'bnet5', 'bnet7', 'in', 'none']
    assert isinstance(make_norm('none', 4), nn.Identity)

def test_learner_treats_bnet_as_norm():
    "wd_bn_bias=False gives BNET no weight decay; train_bn keeps it trainable when frozen."
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.optimizer import SGD
    ds = [(torch.randn(3, 32, 32), torch.tensor(0)) for _ in range(4)]
    dls = DataLoaders(DataLoader(ds, bs=2), DataLoader(ds, bs=2))
    model = bx.xresnet18(n_out=2, norm='bnet')
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=SGD, splitter=lambda m: [list(m[:-1].parameters()), list(m[-1].parameters())])
    learn.create_opt()
    bnet_params = {id(p) for o in model.modules() if isinstance(o, BNET) for p in o.parameters()}
    assert bnet_params
    states = {id(p): learn.opt.state[p] for pg in learn.opt.param_lists for p in pg}
    assert all(states[i].get('do_wd', True) is False for i in bnet_params)
    conv_w = model[0][0].weight
    assert states[id(conv_w)].get('do_wd', True) is True
    learn.freeze()
    assert all(p.requires_grad for o in model.modules() if isinstance(o, BNET) for p in o.parameters())
    assert not conv_w.requires_grad

def test_set_norms_keeps_device_and_dtype():
    "A float64 model (standing in for a CUDA or half one) gets float64 BNETs, which run on its activations."
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)).double()
    bx.set_norms(m, 'bnet')
    assert all(isinstance(o, BNET) for o in m[1:])
    assert {p.dtype for p in m.parameters()} | {b.dtype for b in m.buffers() if b.is_floating_point()} == {torch.float64}
    assert m(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
