"The fastai contract: importing bnet_fastai changes exactly what the patches table lists and no fastai behaviour checked here, every name shared with fastai is a superset, every arch trains from the command line, and fastai's learners take BNET models."
import inspect, json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from torch import nn
from _bnet_ref import KernelWatch, check_bnets_match_reference
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
# fastai's functions that the patches replace stay out of bnet_fastai.all's star import: compare the replacements themselves
from bnet_fastai.fastai_patches import set_bn_eval as _our_set_bn_eval
OURS = {**OURS, 'set_bn_eval': _our_set_bn_eval}
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
                       input=pickle.dumps(x), capture_output=True, timeout=300)
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

def without_and_with_import(script:str, tmp_path) -> tuple:
    "Run `script` (it imports bnet_fastai when its argument is '1') in two fresh processes; the JSON each prints last."
    f = tmp_path/'script.py'; f.write_text(script)
    res = []
    for flag in ('0', '1'):
        r = subprocess.run([sys.executable, str(f), flag], env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return tuple(res)

def test_import_changes_nothing(tmp_path):
    "fastai's behaviour checks give identical results in fresh processes with and without `import bnet_fastai`."
    plain, ours = without_and_with_import(BEHAVIOUR, tmp_path)
    assert plain['pickle'].startswith('fastai.vision.models.xresnet XResNet') and plain['pickle'].endswith('False')
    assert 'ProgressCallback' not in plain['callbacks']
    assert ours == plain

# ---- every change the import makes, derived, against the patches page's table -----------------------------------

CHANGES = textwrap.dedent(r"""
    import json, sys
    import fastai.vision.all, fastai.distributed, fastai.callback.training, fastai.learner, fastai.callback.fp16
    import fastai.torch_core as tc

    def snap():
        "Every attribute of every fastai module and of every class a fastai module defines, as (owner, name) -> object."
        res = {}
        for name, mod in list(sys.modules.items()):
            if not name.startswith('fastai') or mod is None: continue
            for k, v in list(vars(mod).items()):
                res[(name, k)] = v
                if isinstance(v, type) and v.__module__ == name:
                    for a, w in list(vars(v).items()): res[(f'{name}.{k}', a)] = w
        return res

    def diff(before, after, nt_before, nt_after):
        owners = {o for o, _ in before}
        res = [[f'{o}.{k}', 'replaced'] for (o, k), v in before.items() if (o, k) in after and after[(o, k)] is not v]
        res += [[f'{o}.{k}', 'added'] for (o, k) in after if (o, k) not in before and o in owners]
        res = [r for r in res if r[0] != 'fastai.torch_core.norm_types']
        return res + [['fastai.torch_core.norm_types', 'adds ' + t.__name__] for t in nt_after if t not in nt_before]

    def defaults(): return {k: repr(v) for k, v in vars(tc.defaults).items()}
    def defaults_diff(d0, d1): # fastai's settings object: the same object, so its entries are compared
        return [[f'fastai.torch_core.defaults.{k}', 'added' if k not in d0 else 'replaced'] for k in d1 if d0.get(k) != d1[k]]
    out = {}
    before, nt, dflt = snap(), tc.norm_types, defaults()
    import bnet_fastai
    mid, nt_mid, dflt_mid = snap(), tc.norm_types, defaults()
    out['import'] = diff(before, mid, nt, nt_mid) + defaults_diff(dflt, dflt_mid)
    import bnet_fastai.all
    after, nt_after, dflt_after = snap(), tc.norm_types, defaults()
    out['import_all'] = diff(mid, after, nt_mid, nt_after) + defaults_diff(dflt_mid, dflt_after)
    bnet_fastai.fastai_patches.enable_cpu_amp(); bnet_fastai.fastai_patches.enable_sync_bn_norms()
    out['opt_in'] = diff(after, snap(), nt_after, tc.norm_types) + defaults_diff(dflt_after, defaults())
    print(json.dumps(out))
""")

HOOKS = textwrap.dedent(r"""
    import json, sys
    mp = list(sys.meta_path)
    import bnet_fastai
    # bnet_fastai's hooks; a library imported on the way may add its own (six does), which changes nothing of fastai
    added = [f for f in sys.meta_path if f not in mp and type(f).__module__.startswith('bnet_fastai')]
    names = [f.name for f in added]
    import fastai.callback.training, fastai.learner
    print(json.dumps({'hooks': names, 'left_after_training': [f.name for f in sys.meta_path if f in added],
                      'set_bn_eval': fastai.callback.training.set_bn_eval.__module__,
                      'patched': fastai.learner.Learner.create_opt.__module__}))
""")

def _run_json(script, tmp_path, name):
    f = tmp_path/name; f.write_text(script)
    r = subprocess.run([sys.executable, str(f)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def patches_table():
    "The rows of the patches page's table: (changed, change, when)."
    nb = json.loads((root/'nbs'/'03_fastai_patches.ipynb').read_text())
    md = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown' and '| changed | change | when | why |' in ''.join(c['source']))
    rows = [l.strip().strip('|').split('|') for l in md.splitlines() if l.startswith('| `')]
    return [tuple(c.strip() for c in r[:3]) for r in rows]

def _ticked(s): return [t.strip('`') for t in s.split('`')[1::2]]

def expected(rows):
    "The changes the table claims, in the form the subprocess derives them."
    res = set()
    for changed, change, when in rows:
        target = _ticked(changed)[0]
        if target == 'fastai.torch_core.norm_types': res.add((target, 'adds ' + _ticked(change)[0].split('.')[-1]))
        elif target == 'sys.meta_path': res |= {(target, m) for m in _ticked(change)}
        else: res.add((target, 'replaced' if change.startswith('replaced') else 'added'))
    return res

def test_patches_table_is_every_change(tmp_path):
    "Comparing fastai before and after the import, in a fresh process, finds exactly the table's changes; its opt-in rows come only when asked."
    rows = patches_table()
    got = _run_json(CHANGES, tmp_path, 'changes.py')
    on_import = [r for r in rows if not r[2].startswith('opt-in')]
    assert {tuple(c) for c in got['import']} == expected([r for r in on_import if 'bnet_fastai.distributed' not in r[2] and r[0] != '`sys.meta_path`'])
    assert {tuple(c) for c in got['import_all']} == expected([r for r in on_import if 'bnet_fastai.distributed' in r[2]])
    assert {tuple(c) for c in got['opt_in']} == expected([r for r in rows if r[2].startswith('opt-in')])
    # The import hooks: one per patched module not yet imported, each gone once its module is imported
    hooks = _run_json(HOOKS, tmp_path, 'hooks.py')
    assert {('sys.meta_path', h) for h in hooks['hooks']} == expected([r for r in rows if r[0] == '`sys.meta_path`'])
    assert 'fastai.callback.training' in hooks['hooks'] and 'fastai.callback.training' not in hooks['left_after_training']
    assert hooks['set_bn_eval'] == hooks['patched'] == 'bnet_fastai.fastai_patches'

SYNC_BN = textwrap.dedent(r"""
    import json, sys
    from fastai.basics import *
    if sys.argv[1] == '1': import bnet_fastai.all
    torch.manual_seed(0)
    net = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)))
    dls = DataLoaders.from_dsets([(torch.randn(3, 3, 3), 0)] * 4, bs=2, device='cpu')
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), wd=0.1, wd_bn_bias=False, train_bn=True)
    learn.create_opt()
    learn.opt.set_hypers(wd=learn.wd) # as `fit` does
    names = {id(p): n for n, p in net.named_parameters()}
    groups = [[names[id(p)] for p in g] for g in learn.opt.param_lists]
    # the decay each parameter gets: its group's `wd`, unless fastai marked it `do_wd=False`
    wd = {names[id(p)]: h['wd'] if learn.opt.state[p].get('do_wd', True) else 0. for g, h in zip(learn.opt.param_lists, learn.opt.hypers) for p in g}
    print(json.dumps({'groups': groups, 'wd': wd, 'force_train': {names[id(p)]: learn.opt.state[p].get('force_train', False) for p in net.parameters()}}))
""")

def test_sync_bn_model_keeps_fastai_weight_decay(tmp_path):
    "A plain fastai Learner on a SyncBatchNorm model: same param groups, weight decay and `train_bn` flags with and without the import."
    plain, ours = without_and_with_import(SYNC_BN, tmp_path)
    assert plain['wd'] == {'0.weight': 0.1, '0.bias': 0., '1.weight': 0.1, '1.bias': 0., '4.weight': 0.1, '4.bias': 0.} # fastai: a SyncBatchNorm is no norm
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
def test_train_cli_every_zoo_arch(arch, nette_home, tmp_path):
    "A fresh `bnet-train` process that imported nothing else knows every zoo architecture and trains it (Imagenette's layout, 40 images: 5 batches)."
    r = subprocess.run(['bnet-train', '--dataset', str(nette_home/'data'/'imagenette2-160'), '--arch', arch, '--norm', 'bnet', '--epochs', '1',
                        '--size', '32', '--bs', '8', '--precision', 'fp32', '--out', str(tmp_path/'run')], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from bnet_fastai.models.xresnet import arch_registry
    m = json.loads((tmp_path/'run'/'bnet_s0'/'metrics.json').read_text())
    # it trained that architecture: the run's parameter count is the registry's BNET model's
    assert m['epochs'] == 1 and m['n_params'] == sum(p.numel() for p in arch_registry[arch](n_out=10, norm='bnet').parameters())

def test_arch_registry_complete_in_fresh_process():
    r = subprocess.run([sys.executable, '-c', 'from bnet_fastai.models.xresnet import arch_registry; import bnet_fastai.train; print(" ".join(arch_registry))'],
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

def _check_trains_bnets(learn):
    "`fit` (fp32) trains every BNET's kernel, the spatial taps included, and the trained BNETs compute BNET's maths."
    with KernelWatch(learn.model) as kw, learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert check_bnets_match_reference(learn.model, learn.dls.one_batch()[0]) == kw.check() > 0

def test_vision_learner_bnet():
    from fastai.vision.learner import vision_learner, model_meta
    from bnet_fastai.models.xresnet import xresnet18, with_norm
    arch = with_norm(xresnet18, 'bnet')
    learn = vision_learner(_learner_data(), arch, pretrained=False, n_out=2, loss_func=nn.CrossEntropyLoss())
    assert len(learn.splitter(learn.model)) == 3 and model_meta[arch] == model_meta[fx.xresnet18]
    _check_trains_bnets(learn)
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
    _check_trains_bnets(learn)
    assert learn.model(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)
    _check_frozen(learn)
