"The model zoo: every model × norm × activation runs, round-trips, traces, and matches its reference layout."
import inspect, pytest, torch
from torch import nn
import bnet_fastai  # applies the fastai patches
from fastai.vision.models import xresnet as fx
from bnet_fastai.layers import BNET
from bnet_fastai.activations import Mila, Swish, BentID
from bnet_fastai.models import xresnet as bx
from bnet_fastai.models.zoo import zoo_registry as zoo, mininet, xsemininet, mininest_ba, mininest_bn
from bnet_fastai.placement import branch_last_norms
from _bnet_ref import check_bnets_match_reference, KernelWatch

NORMS = ['bn', 'bnet', 'bnet5']
ACTS = {'relu': nn.ReLU, 'mish': nn.Mish, 'swish': Swish, 'mila': Mila, 'bent_id': BentID}
n_params = lambda m: sum(p.numel() for p in m.parameters())

@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # Tiny inputs: one thread is as fast as two, and does not spin against other processes on a shared CPU.
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def xb(): return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

@pytest.fixture(scope='module')
def n_bns():
    "The number of BatchNorms in each zoo model built with BatchNorm (on the meta device: only the layout counts)."
    with torch.device('meta'): return {n: sum(isinstance(b, nn.BatchNorm2d) for b in zoo[n](n_out=7).modules()) for n in zoo}

# resnest50 has 25M parameters: it runs (is built on the CPU) once per norm, each norm with another activation; every
# activation is still checked in its layout, on the meta device, where building allocates and initialises nothing.
HEAVY = {'resnest50'}

@pytest.mark.parametrize('norm', NORMS)
@pytest.mark.parametrize('name', list(zoo))
def test_matrix(name, norm, xb, n_bns):
    """Each activation and norm is where it belongs; fwd+bwd (fp32) gives (2, n_out) and finite grads; a state_dict round trip
    into a fresh model gives identical outputs."""
    for i, (act, cls) in enumerate(ACTS.items()):
        runs = name not in HEAVY or i == NORMS.index(norm)
        torch.manual_seed(0)
        with torch.device('cpu' if runs else 'meta'): m = zoo[name](n_out=7, norm=norm, act_cls=act)
        acts = [a for a in m.modules() if isinstance(a, tuple(ACTS.values()))]
        assert acts and all(isinstance(a, cls) for a in acts), (act, {type(a) for a in acts})
        n_bnet, n_bn = (sum(isinstance(b, t) for b in m.modules()) for t in (BNET, nn.BatchNorm2d))
        # BNET replaces every norm: as many as the BatchNorm model has (each BNET holds one plain BatchNorm)
        assert (n_bnet, n_bn) == ((0, n_bn) if not norm.startswith('bnet') else (n_bns[name], n_bns[name]))
        if not runs: continue
        y = m(xb)
        assert y.shape == (2, 7)
        y.square().mean().backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), act
        assert sum(g.abs().sum() for g in grads) > 0
        m.eval()
        with torch.no_grad(): ref = m(xb)
        # The fresh model is built on the meta device and takes the saved tensors themselves: every tensor the model
        # needs must be in its state_dict (one left out would stay on meta and fail), and no second init runs.
        with torch.device('meta'): fresh = zoo[name](n_out=7, norm=norm, act_cls=act).eval()
        fresh.load_state_dict(m.state_dict(), assign=True)
        with torch.no_grad(): torch.testing.assert_close(fresh(xb), ref, atol=0, rtol=0)

@pytest.mark.parametrize('name', list(zoo))
def test_trace_bnet(name, xb):
    m = zoo[name](n_out=10, norm='bnet', act_cls='mish').eval()
    with torch.no_grad():
        traced = torch.jit.trace(m, xb)
        x2 = torch.randn(3, 3, 96, 96)
        torch.testing.assert_close(traced(x2), m(x2))

# The original library's BatchNorm parameter counts at 10 classes, where our construction is the same network.
@pytest.mark.parametrize('name,n', [('xmininet', 4_930_154), ('mininest_ba', 5_457_674), ('mininest_bn', 8_583_178)])
def test_reference_param_counts(name, n): assert n_params(zoo[name](n_out=10)) == n

def test_deliberate_differences():
    # mininet: torchvision's stem conv (no bias); xsemininet: fastai's SE module (biased convs, no norm)
    assert n_params(mininet(n_out=10)) == 4_910_986 - 64
    assert n_params(xsemininet(n_out=10)) == 4_976_234 - 1_024
    # resnest50 is ResNeSt-50 [3,4,6,3], not [3,4,5,6]
    m = zoo['resnest50'](n_out=10)
    assert [len(getattr(m, f'layer{i}')) for i in range(1, 5)] == [3, 4, 6, 3]

def test_mininet_is_torchvision(xb):
    import torchvision
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1,1,1,1], num_classes=10).eval()
    m = mininet(n_out=10).eval()
    assert [(k, v.shape) for k, v in m.state_dict().items()] == [(k, v.shape) for k, v in tv.state_dict().items()]
    m.load_state_dict(tv.state_dict())
    with torch.no_grad(): torch.testing.assert_close(m(xb), tv(xb))

def test_mininest_bn_is_timm_resnest14d(xb):
    import timm
    ref = timm.create_model('resnest14d', num_classes=10).eval()
    m = mininest_bn(n_out=10).eval()
    assert [(k, v.shape) for k, v in m.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    m.load_state_dict(ref.state_dict())
    with torch.no_grad(): torch.testing.assert_close(m(xb), ref(xb))

def test_xmininet_is_fastai(xb):
    torch.manual_seed(5); m = zoo['xmininet'](n_out=10).eval()
    torch.manual_seed(5); ref = fx.XResNet(fx.ResBlock, 1, [1,1,1,1], n_out=10).eval()
    with torch.no_grad(): torch.testing.assert_close(m(xb), ref(xb), atol=0, rtol=0)

def _branch_outputs(m, x):
    ends = branch_last_norms(m)
    outs = []
    hooks = [e.register_forward_hook(lambda mod, i, o: outs.append(o.detach().abs().max().item())) for e in ends]
    m(x)
    for h in hooks: h.remove()
    return ends, outs

@pytest.mark.parametrize('build,default', [(mininet, False), (mininest_bn, True)])
@pytest.mark.parametrize('norm', ['bn', 'bnet'])
def test_zero_init_residual(build, default, norm, xb):
    "Residual-last norms start at zero (after timm's kaiming init) when asked, and only then."
    ends, outs = _branch_outputs(build(n_out=10, norm=norm, zero_init_residual=True), xb)
    assert len(ends) == 4 and max(outs) == 0
    ends, outs = _branch_outputs(build(n_out=10, norm=norm, zero_init_residual=False), xb)
    assert min(outs) > 0
    ends, outs = _branch_outputs(build(n_out=10, norm=norm), xb)
    assert (max(outs) == 0) == default

def test_bnet_init_survives_timm_init():
    "timm kaiming-inits every conv; each BNET must still start as BN(γ=1, β=0): an identity kernel."
    for build in (mininet, mininest_ba, mininest_bn):
        bnets = [b for b in build(n_out=10, norm='bnet', zero_init_residual=False).modules() if isinstance(b, BNET)]
        ident = torch.zeros(3, 3); ident[1, 1] = 1
        assert bnets and all(torch.equal(b.conv.weight[:, 0], ident.expand(b.nf, 3, 3)) for b in bnets)
        assert all(not b.conv.bias.any() for b in bnets)

def test_bad_names_raise_where_passed():
    for build in zoo.values():
        with pytest.raises(ValueError, match="'gn'.*valid norms"): build(norm='gn')
        with pytest.raises(ValueError, match="'tanhexp'.*valid activations"): build(act_cls='tanhexp')
    with pytest.raises(ValueError, match='no residual branch'): mininest_ba(zero_init_residual=True)

def test_sa_and_xresnet_options(xb):
    from fastai.layers import SimpleSelfAttention
    for build in (zoo['xmininet'], xsemininet):
        m = build(n_out=5, norm='bnet', sa=True, ks=5, stem_szs=(16, 16, 32), widen=0.5)
        assert sum(isinstance(a, SimpleSelfAttention) for a in m.modules()) == 1
        assert m[0][0].kernel_size == (5, 5) and m[2][0].out_channels == 32
        m(xb).sum().backward()

def test_act_cls_by_name_on_fastai_builders(xb):
    "Our XResNet builders take act_cls by name or class."
    for m in (bx.xresnet18(n_out=3, act_cls='mila'), bx.xse_resnext18(n_out=3, act_cls=Mila)):
        acts = {type(a) for a in m.modules() if isinstance(a, (nn.ReLU, Mila))}
        assert acts == {Mila}
        assert m(xb).shape == (2, 3)

def test_zoo_builders_like_fastais():
    "The zoo builders come from the XResNet family's `arch_builder`: fastai's `pretrained` first, and no weights to load."
    for name, build in zoo.items():
        assert list(inspect.signature(build).parameters)[0] == 'pretrained' and build.__name__ == name
        with pytest.raises(ValueError, match=f'{name}.*no pretrained weights'): build(True)

@pytest.mark.slow
def test_learner_trains_xsemininet():
    "One epoch of fastai training (fp32) trains every BNET's kernel, and the trained BNETs compute BNET's maths."
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    import fastai.callback.schedule  # adds Learner.fit_one_cycle
    # Ten classes, each a fixed random 16×16 pattern plus noise.
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 3, 16, 16, generator=g)
    y = torch.arange(160) % 10
    x = protos[y] + 0.5 * torch.randn(160, 3, 16, 16, generator=g)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:128], ds[128:], bs=16, device='cpu')
    learn = Learner(dls, xsemininet(n_out=10, norm='bnet', act_cls='mish'), loss_func=CrossEntropyLossFlat())
    learn.model.eval()
    with torch.no_grad(): before = learn.loss_func(learn.model(x), y).item()
    with KernelWatch(learn.model) as kw, learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 3e-3)
    learn.model.eval()
    with torch.no_grad(): after = learn.loss_func(learn.model(x), y).item()
    losses = [l.item() for l in learn.recorder.losses]
    assert len(losses) == 8
    assert after < before, (before, after, losses)
    # Every kernel moved off its start, the off-centre taps too wherever the map is larger than 1×1: the spatial kernel learned.
    n = kw.check()
    assert check_bnets_match_reference(learn.model, x[:16]) == n

@pytest.mark.parametrize('build', [mininet, mininest_bn])
def test_bnet_at_last(build):
    "bnet_at='last' puts BNET exactly where timm's own `zero_init_last` zeroes γ, and BatchNorm everywhere else."
    ref = build(n_out=10, zero_init_residual=True)
    zeroed = [n for n, b in ref.named_modules() if isinstance(b, nn.BatchNorm2d) and not b.weight.any()]
    m = build(n_out=10, norm='bnet', bnet_at='last')
    assert len(zeroed) == 4 and [n for n, b in m.named_modules() if isinstance(b, BNET)] == zeroed
    assert m.bnet_at == 'last' and sum(isinstance(b, nn.BatchNorm2d) and b.affine for b in m.modules()) == n_bns_of(ref) - 4

def n_bns_of(m): return sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())

def test_bnet_at_last_needs_a_branch_end():
    with pytest.raises(ValueError, match="bnet_at='last' found no residual branch ending in a norm.*use bnet_at='all'"):
        mininest_ba(norm='bnet', bnet_at='last')
    with pytest.raises(ValueError, match="unknown bnet_at='first'; valid choices: 'all', 'last'"): mininet(bnet_at='first')
