"The fastai contract: importing bnet_fastai changes nothing unasked, every name shared with fastai is a superset, every arch trains from the command line, and fastai's learners take BNET models."
import inspect, json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from torch import nn
from fastai.vision.models import xresnet as fx

root = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]), 'MPLBACKEND': 'Agg'}

def star(module):
    "The names `from module import *` binds, as a dict."
    ns = {}
    exec(f'from {module} import *', ns)
    ns.pop('__builtins__', None)
    return ns

FASTAI, OURS = star('fastai.vision.all'), star('bnet_fastai.all')
SHARED = sorted(n for n in OURS if n in FASTAI and OURS[n] is not FASTAI[n])
BUILDERS = [n for n in SHARED if n in fx.__all__ and n.startswith('x')]
# Every shared name must be in one of the checked groups below; a new export that shadows fastai fails here.
CHECKED = set(BUILDERS) | {'set_bn_eval', 'Swish'}

def test_every_shared_name_is_checked():
    assert set(SHARED) - CHECKED == set(), f"names shadowing fastai's without a superset check: {set(SHARED) - CHECKED}"
    assert len(BUILDERS) == len([n for n in fx.__all__ if n.startswith('x') and callable(getattr(fx, n))])

def test_ranger_left_to_fastai():
    assert 'ranger' not in SHARED
    from fastai.optimizer import ranger
    ns = star('fastai.vision.all'); exec('from bnet_fastai.all import *', ns)
    assert ns['ranger'] is ranger

def assert_superset(ours, theirs):
    "`ours` takes `theirs`'s parameters first, with the same names, kinds and defaults, and `**kwargs` where it does."
    po, pt = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    fixed = [p for p in pt.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert [(p.name, p.kind, p.default) for p in list(po.values())[:len(fixed)]] == [(p.name, p.kind, p.default) for p in fixed]
    for kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        if any(p.kind == kind for p in pt.values()): assert any(p.kind == kind for p in po.values()), (ours, kind)

@pytest.mark.parametrize('name', BUILDERS)
def test_builder_signature(name): assert_superset(OURS[name], FASTAI[name])

def _small(name):
    "Keyword arguments both builders take that keep the model small (fastai's xsenet154 needs groups=64)."
    return dict(n_out=3, widen=0.5 if 'resnext' in name else 0.25, **({'groups': 1} if name == 'xsenet154' else {}))

@pytest.mark.parametrize('name', BUILDERS)
def test_builder_same_model(name):
    "At norm=None and norm='bn', our builder builds fastai's model: same layers, same state_dict from the same seed, same output."
    import bnet_fastai  # fastai's own xsenet154 raises; the patched one (on the module, not the star-imported copy) is the reference
    kw = _small(name)
    theirs_fn = getattr(fx, name) if name == 'xsenet154' else FASTAI[name]
    torch.manual_seed(0); theirs = theirs_fn(**kw).eval()
    for norm in (None, 'bn'):
        torch.manual_seed(0); ours = OURS[name](**kw, **({} if norm is None else {'norm': norm})).eval()
        sa, sb = theirs.state_dict(), ours.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert repr(theirs)[repr(theirs).index('('):] == repr(ours)[repr(ours).index('('):]
        if '18' in name:  # a forward pass through the deep ones adds time, not evidence
            xb = torch.randn(2, 3, 32, 32)
            with torch.no_grad(): assert torch.equal(theirs(xb), ours(xb))

def test_builder_positional_and_pretrained():
    torch.manual_seed(0); a = fx.xresnet18(False, n_out=3)
    torch.manual_seed(0); b = OURS['xresnet18'](False, n_out=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(0); a = fx.xse_resnet18(3, False, widen=0.25)
    torch.manual_seed(0); b = OURS['xse_resnet18'](3, False, widen=0.25)
    assert a[-1].out_features == b[-1].out_features == 3
    with pytest.raises(ValueError, match=r"norm='bnet'.*no pretrained weights"): OURS['xresnet50'](pretrained=True, norm='bnet')
    with pytest.raises(ValueError, match="no pretrained weights"): OURS['xse_resnet18'](3, True, norm='bnet5')
    # With BatchNorm, pretrained=True is fastai's own path: fastai's xse builders ignore it, and so does ours.
    torch.manual_seed(0); a = fx.xse_resnet18(3, True, widen=0.25)
    torch.manual_seed(0); b = OURS['xse_resnet18'](3, True, widen=0.25)
    assert type(b) is fx.XResNet and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

def test_swish():
    assert_superset(OURS['Swish'], FASTAI['Swish'])
    x = torch.randn(100)
    assert torch.allclose(OURS['Swish']()(x), FASTAI['Swish']()(x))
    y, z = x.clone(), x.clone()
    OURS['Swish'](True)(y); FASTAI['Swish'](True)(z)
    assert torch.equal(y, z) and not torch.equal(y, x)
    assert isinstance(OURS['Swish'](), FASTAI['Swish'])

def _nested():
    "Frozen BatchNorms at two depths, with a trainable one beside them."
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4))), nn.BatchNorm2d(4))
    for bn in (m[1], m[2][0], m[2][1][0]):
        for p in bn.parameters(): p.requires_grad_(False)
    return m

@pytest.mark.parametrize('start', [True, False])
@pytest.mark.parametrize('use_eval', [True, False, None])
def test_set_bn_eval(use_eval, start):
    assert_superset(OURS['set_bn_eval'], FASTAI['set_bn_eval'])
    res = []
    for f in (OURS['set_bn_eval'], FASTAI['set_bn_eval']):
        m = _nested().train(start)
        f(m) if use_eval is None else f(m, use_eval)
        res.append([l.training for l in m.modules()])
    assert res[0] == res[1]

def test_set_bn_eval_bnet():
    from bnet_fastai.layers import BNET
    m = nn.Sequential(nn.Conv2d(3, 8, 3), BNET(8))
    for p in m[1].parameters(): p.requires_grad_(False)
    m.train(); OURS['set_bn_eval'](m)
    assert (m[0].training, m[1].training, m[1].bn.training) == (True, False, False)
    OURS['set_bn_eval'](m, False)
    assert m[1].training and m[1].bn.training

BEHAVIOUR = textwrap.dedent('''
    import json, pickle, subprocess, sys, warnings, inspect
    from fastai.basics import *
    if sys.argv[1] == '1': import bnet_fastai
    out = {'callbacks': [c.__name__ for c in defaults.callbacks]}
    import fastai.callback.training as tr
    out['set_bn_eval'] = str(inspect.signature(tr.set_bn_eval))
    for use_eval in (True, False):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)), nn.BatchNorm2d(4))
        for bn in (m[1], m[2][0]): bn.requires_grad_(False)
        m.train(); tr.set_bn_eval(m, use_eval)
        out[f'set_bn_eval_{use_eval}'] = [l.training for l in m.modules()]
    from fastai.vision.models.xresnet import XResNet, xresnet18
    from fastai.layers import ResBlock
    torch.manual_seed(0); x = XResNet(ResBlock, 1, [2,2,2,2], 0.5, n_out=3)
    out['XResNet'] = [type(x).__module__, type(x).__name__, x[-2].p, sum(p.numel() for p in x.parameters())]
    out['XResNet_sig'] = list(inspect.signature(XResNet).parameters)
    torch.manual_seed(0); x = xresnet18(n_out=3)
    r = subprocess.run([sys.executable, '-c', 'import pickle, sys; m = pickle.load(sys.stdin.buffer); '
                        'print(type(m).__module__, type(m).__name__, sum(p.numel() for p in m.parameters()), "bnet_fastai" in sys.modules)'],
                       input=pickle.dumps(x), capture_output=True)
    out['pickle'] = r.stdout.decode().strip() or r.stderr.decode()[-300:]
    from fastai.callback.fp16 import MixedPrecision
    set_seed(0) # the loaders' shuffling draws from Python's generator too
    xy = [(torch.randn(3, 6, 6), torch.tensor(i % 2)) for i in range(16)]
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    learn = Learner(DataLoaders.from_dsets(xy, xy, bs=8, device='cpu'), net, loss_func=nn.CrossEntropyLoss()).to_fp16()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        preds, _ = learn.get_preds()
    out['to_fp16'] = [str(preds.dtype), preds.sum().item()]
    out['learner_cbs'] = [type(c).__name__ for c in learn.cbs] # after `fit` ran `create_opt` with fastai's default optimizer
    out['callbacks_end'] = [c.__name__ for c in defaults.callbacks]
    print(json.dumps(out))
''')

def test_import_changes_nothing(tmp_path):
    "fastai's behaviour checks give identical results in fresh processes with and without `import bnet_fastai`."
    script = tmp_path/'behaviour.py'; script.write_text(BEHAVIOUR)
    res = []
    for flag in ('0', '1'):
        r = subprocess.run([sys.executable, str(script), flag], env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res.append(json.loads(r.stdout.strip().splitlines()[-1]))
    plain, ours = res
    assert plain['pickle'].startswith('fastai.vision.models.xresnet XResNet') and plain['pickle'].endswith('False')
    assert 'ProgressCallback' not in plain['callbacks']
    assert ours == plain

def test_xsenet154_fixed():
    "fastai 2.8's `xsenet154` raises; the gated fix builds fastai's own class with SENet-154's layout (small widths here)."
    from bnet_fastai.fastai_patches import xsenet154_broken, _originals
    assert xsenet154_broken(_originals['xsenet154']) and not xsenet154_broken(fx.xsenet154)
    m = fx.xsenet154(n_out=3, widen=0.25, groups=1)
    assert type(m) is fx.XResNet and (m.expansion, m.block) == (4, fx.SEBlock)
    assert [len(s) for s in list(m.children())[4:8]] == fx.g3

ZOO = ['mininet', 'xmininet', 'xsemininet', 'mininest_ba', 'mininest_bn', 'resnest50']

@pytest.mark.slow
@pytest.mark.parametrize('arch', ZOO)
def test_train_cli_every_zoo_arch(arch, tmp_path):
    "A fresh `bnet-train` process that imported nothing else knows every zoo architecture."
    r = subprocess.run(['bnet-train', '--dataset', 'digits', '--arch', arch, '--norm', 'bnet', '--epochs', '1',
                        '--size', '32', '--bs', '32', '--out', str(tmp_path/'run')], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

def test_arch_registry_complete_in_fresh_process():
    r = subprocess.run([sys.executable, '-c', 'from bnet_fastai.train import arch_registry; print(" ".join(arch_registry))'],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(ZOO) | set(BUILDERS) <= set(r.stdout.split())

def _learner_data(seg=False, n=16, size=64):
    from fastai.data.core import DataLoaders
    torch.manual_seed(0)
    xs = torch.randn(n, 3, size, size)
    ys = (xs[:, 0] > 0).long() if seg else (xs.mean((1, 2, 3)) > 0).long()
    ds = list(zip(xs, ys))
    return DataLoaders.from_dsets(ds, ds, bs=8, device='cpu')

def _norm_params(m):
    from bnet_fastai.layers import BNET
    norms = [l for l in m.modules() if isinstance(l, (BNET, nn.BatchNorm1d, nn.BatchNorm2d))]
    return {id(p) for l in norms for p in l.parameters()}

def _check_frozen(learn):
    "After `freeze()` exactly the head's (everything after the body) and every norm's parameters train."
    learn.freeze()
    m = learn.model
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    head = {id(p) for l in list(m.children())[1:] for p in l.parameters()} if not hasattr(m, 'layers') else \
           {id(p) for l in list(m.layers)[1:] for p in l.parameters()}
    body = m[0]
    from bnet_fastai.layers import BNET
    bnet_convs = {id(p) for l in body.modules() if isinstance(l, BNET) for p in l.conv.parameters()}
    assert bnet_convs and bnet_convs <= trainable
    assert trainable == head | _norm_params(body)
    assert any(not p.requires_grad for p in body.parameters())

def test_vision_learner_bnet():
    from fastai.vision.learner import vision_learner, model_meta
    from bnet_fastai.models.xresnet import xresnet18, with_norm
    arch = with_norm(xresnet18, 'bnet')
    learn = vision_learner(_learner_data(), arch, pretrained=False, n_out=2, loss_func=nn.CrossEntropyLoss())
    assert len(learn.splitter(learn.model)) == 3 and model_meta[arch] == model_meta[fx.xresnet18]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()
    _check_frozen(learn)
    # fastai's default is pretrained=True: there are no BNET weights, and the error says so
    with pytest.raises(ValueError, match='no pretrained weights'): vision_learner(_learner_data(), arch, n_out=2)

@pytest.mark.slow
def test_unet_learner_bnet():
    from fastai.vision.learner import unet_learner
    from fastai.losses import CrossEntropyLossFlat
    from bnet_fastai.models.xresnet import xresnet34, with_norm
    learn = unet_learner(_learner_data(seg=True), with_norm(xresnet34, 'bnet'), pretrained=False, n_out=2,
                         loss_func=CrossEntropyLossFlat(axis=1))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.model(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)
    _check_frozen(learn)
