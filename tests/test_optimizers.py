"Acceptance tests for `bnet_fastai.optimizers`: the wrapping keeps pytorch_optimizer's maths, fastai schedules it, weight decay skips norms and biases."
import math, copy, re, warnings, pytest, torch
from pathlib import Path
import torch.nn.functional as F
from torch import nn
import pytorch_optimizer as po
import bnet_fastai
from bnet_fastai.layers import BNET
from bnet_fastai.models.xresnet import xresnet18
from bnet_fastai.optimizers import *
from fastai.data.load import DataLoader
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
import fastai.callback.schedule
from _digits import digits_dls

# ---- fixtures -----------------------------------------------------------------------------------------------

def tiny_net():
    "Convs, a BNET, a BatchNorm, a LayerNorm and a linear head: every kind of parameter the wd rules distinguish."
    # No conv bias before a norm: its gradient is rounding noise, which adaptive optimizers amplify into O(lr) steps.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BNET(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3))

def tiny_batches(n=10, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n*bs, 3, 6, 6, generator=g); ys = torch.randint(0, 3, (n*bs,), generator=g)
    return xs, ys

def tiny_dls(xs, ys, bs=8):
    ds = list(zip(xs, ys))
    return DataLoaders(DataLoader(ds, bs=bs, shuffle=False), DataLoader(ds[:bs], bs=bs))

def no_decay_names(model):
    "Written out independently of fastai: every parameter of a norm layer (a BNET as a whole) and every bias."
    res = {k for k, _ in model.named_parameters() if k.endswith('bias')}
    for mn, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, BNET)): res |= {f'{mn}.{pn}' for pn, _ in m.named_parameters()}
    return res

def one_cycle(pct, lo, hi, end):
    "fastai's one-cycle curve written out: cosine lo→hi over the first 25%, then cosine hi→end."
    cos = lambda a, b, t: a + (1 + math.cos(math.pi*(1 - t))) * (b - a) / 2
    return cos(lo, hi, pct/0.25) if pct < 0.25 else cos(hi, end, (pct - 0.25)/0.75)

def lr_at(i, n, lr_max): return one_cycle(i/n, lr_max/25, lr_max, lr_max/1e5)
def mom_at(i, n): return one_cycle(i/n, 0.95, 0.85, 0.95)

class SeedBeforeStep(Callback):
    "AdaHessian draws Rademacher probes inside `step`: seed them the same way in both runs."
    order = 100
    def before_step(self): torch.manual_seed(1000 + self.learn.iter)

# The same configurations, spelled out with pytorch_optimizer alone: (opt_func, build(groups, lr, mom, sqr_mom, wd) -> optimizer)
WD = 0.1
REFS = {
    'ranger':      (ranger,      lambda gs: po.Ranger(gs, lr=1., betas=(0.95, 0.999), alpha=0.5, k=6, eps=1e-5, use_gc=True, degenerated_to_sgd=True)),
    'ralamb':      (ralamb,      lambda gs: po.Lamb(gs, lr=1., betas=(0.9, 0.999), eps=1e-8, rectify=True, degenerated_to_sgd=True,
                                                    grad_averaging=True, weight_decouple=True, adam=False, pre_norm=False)),
    'ranger_lars': (ranger_lars, lambda gs: po.Lookahead(po.Lamb(gs, lr=1., betas=(0.9, 0.999), eps=1e-8, rectify=True, degenerated_to_sgd=True,
                                                                 grad_averaging=True, weight_decouple=True, adam=False, pre_norm=False), k=6, alpha=0.5)),
    'adahessian':  (adahessian,  lambda gs: po.AdaHessian(gs, lr=1., betas=(0.9, 0.999), eps=1e-4, hessian_power=1., hessian_distribution='rademacher')),
    'adamod':      (adamod,      lambda gs: po.AdaMod(gs, lr=1., betas=(0.9, 0.999, 0.999), eps=1e-8)),
    'diffgrad':    (diffgrad,    lambda gs: po.DiffGrad(gs, lr=1., betas=(0.9, 0.999), eps=1e-8)),
    'novograd':    (novograd,    lambda gs: po.NovoGrad(gs, lr=1., betas=(0.95, 0.98), eps=1e-8)),
    'lookahead(adamod)': (lookahead(adamod, k=3, alpha=0.6),
                          lambda gs: po.Lookahead(po.AdaMod(gs, lr=1., betas=(0.9, 0.999, 0.999), eps=1e-8), k=3, alpha=0.6)),
}

# ---- equivalence ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(REFS))
def test_equivalence_with_pytorch_optimizer(name):
    opt_func, build = REFS[name]
    n, lr_max = 10, 1e-2
    xs, ys = tiny_batches(n)
    torch.manual_seed(0); net = tiny_net(); ref = copy.deepcopy(net); init = copy.deepcopy(net.state_dict())

    learn = Learner(tiny_dls(xs, ys), net, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, wd=WD, cbs=SeedBeforeStep())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, lr_max)

    # By hand: decayed and undecayed groups in model order, fastai's schedule written out above.
    nd = no_decay_names(ref)
    named = list(ref.named_parameters())
    groups = [{'params': [p for k, p in named if k not in nd], 'weight_decay': WD},
              {'params': [p for k, p in named if k in nd], 'weight_decay': 0.}]
    opt = build(groups)
    ref.train()
    hessian = name == 'adahessian'
    for i in range(n):
        for g in opt.param_groups:
            g['lr'] = lr_at(i, n, lr_max); g['betas'] = (mom_at(i, n), *g['betas'][1:])
        loss = F.cross_entropy(ref(xs[i*8:(i+1)*8]), ys[i*8:(i+1)*8])
        loss.backward(create_graph=hessian)
        torch.manual_seed(1000 + i)
        opt.step(); opt.zero_grad(set_to_none=True)

    got, want = dict(net.named_parameters()), dict(ref.named_parameters())
    diffs = {k: (got[k] - want[k]).abs().max().item() for k in want}
    assert max(diffs.values()) <= 1e-6, f'{name}: {diffs}'
    # and the run really moved the weights
    assert not torch.equal(want['0.weight'], init['0.weight'])

# ---- scheduling -----------------------------------------------------------------------------------------------

class RecordPG(Callback):
    "What the underlying pytorch param groups hold when the step runs."
    order = 100
    def before_fit(self): self.seen_lrs, self.seen_moms = [], []
    def before_step(self):
        pgs = self.learn.opt.opt.param_groups
        self.seen_lrs.append([g['lr'] for g in pgs]); self.seen_moms.append([g['betas'][0] for g in pgs])

@pytest.mark.parametrize('name', list(opt_registry))
def test_one_cycle_schedules_lr_and_mom(name):
    n = 10
    xs, ys = tiny_batches(n)
    rec = RecordPG()
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=get_opt(name), cbs=rec)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    assert len(rec.seen_lrs) == n
    for i, (lrs, moms) in enumerate(zip(rec.seen_lrs, rec.seen_moms)):
        assert len(lrs) == 2 # decayed and undecayed groups, scheduled alike
        for lr in lrs: assert lr == pytest.approx(lr_at(i, n, 1e-2), rel=1e-6)
        for m in moms: assert m == pytest.approx(mom_at(i, n), rel=1e-6)
    lr0 = [l[0] for l in rec.seen_lrs]; m0 = [m[0] for m in rec.seen_moms]
    peak = lr0.index(max(lr0))
    assert 0 < peak < n-1 and lr0[0] < lr0[peak] > lr0[-1]
    assert m0[0] == pytest.approx(0.95) and min(m0) == pytest.approx(0.85, abs=5e-3) and m0[-1] > min(m0)

def test_flat_cos_and_sqr_mom():
    xs, ys = tiny_batches(10)
    rec = RecordPG()
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=ranger, cbs=rec)
    with learn.no_bar(), learn.no_logging(): learn.fit_flat_cos(1, 1e-2)
    lr0 = [l[0] for l in rec.seen_lrs]
    assert lr0[:7] == pytest.approx([1e-2]*7) and lr0[-1] < 1e-2
    # sqr_mom is betas[1], and Ranger's lookahead alpha keeps its own name
    learn.opt.set_hyper('sqr_mom', 0.98)
    assert all(g['betas'][1] == 0.98 and g['alpha'] == 0.5 for g in learn.opt.opt.param_groups)

# ---- weight decay ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(opt_registry) + ['lookahead(ralamb)'])
@pytest.mark.parametrize('wd_bn_bias', [False, True])
def test_weight_decay_groups(name, wd_bn_bias):
    xs, ys = tiny_batches(2)
    opt_func = lookahead('ralamb') if name.startswith('lookahead') else get_opt(name)
    net = tiny_net()
    learn = Learner(tiny_dls(xs, ys), net, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, wd=WD, wd_bn_bias=wd_bn_bias)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    names = {id(p): k for k, p in net.named_parameters()}
    wd_of = {names[id(p)]: g['weight_decay'] for g in learn.opt.opt.param_groups for p in g['params']}
    nd = no_decay_names(net)
    assert {'1.conv.weight', '1.conv.bias', '4.weight', '4.bias', '8.weight', '8.bias', '9.bias'} <= nd
    assert set(wd_of) == set(names.values())
    assert wd_of == {k: (0. if k in nd and not wd_bn_bias else WD) for k in wd_of}
    assert learn.opt.hypers[0]['wd'] == WD

# ---- freezing -------------------------------------------------------------------------------------------------

def test_freeze_unfreeze_ranger_lars():
    xs, ys = tiny_batches(4)
    net = tiny_net()
    split = lambda m: [list(m[:4].parameters()), list(m[4:].parameters())]
    learn = Learner(tiny_dls(xs, ys), net, loss_func=nn.CrossEntropyLoss(), opt_func=ranger_lars, splitter=split)
    snap = lambda: {k: p.detach().clone() for k, p in net.named_parameters()}
    with learn.no_bar(), learn.no_logging():
        learn.freeze(); s0 = snap(); learn.fit(1, 1e-2); s1 = snap()
        learn.unfreeze(); learn.fit(1, 1e-2); s2 = snap()
    assert torch.equal(s0['0.weight'], s1['0.weight']) and torch.equal(s0['3.weight'], s1['3.weight'])  # frozen body
    assert not torch.equal(s0['1.conv.weight'], s1['1.conv.weight'])  # train_bn: BNET still trains
    assert not torch.equal(s0['9.weight'], s1['9.weight'])               # head trains
    assert not torch.equal(s1['0.weight'], s2['0.weight'])               # unfrozen body trains

class BodySnapshots(Callback):
    "The body's weights when each fit starts and ends."
    order = 100
    def before_fit(self): self.snaps = getattr(self, 'snaps', []) + [self.learn.model[0].weight.detach().clone()]
    def after_fit(self): self.snaps.append(self.learn.model[0].weight.detach().clone())

@pytest.mark.parametrize('name', list(opt_registry))
def test_fine_tune(name):
    "fine_tune's frozen epoch leaves the body's conv alone and trains the head; the unfrozen epoch trains the body too."
    xs, ys = tiny_batches(2)
    split = lambda m: [list(m[:4].parameters()), list(m[4:].parameters())]
    snaps = BodySnapshots()
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=get_opt(name), splitter=split,
                    cbs=snaps)
    head0 = learn.model[9].weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3, freeze_epochs=1)
    (f0, f1), (u0, u1) = snaps.snaps[:2], snaps.snaps[2:]
    assert torch.equal(f0, f1) and not torch.equal(u0, u1)
    assert not torch.equal(head0, learn.model[9].weight)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())

# ---- AdaHessian precision -------------------------------------------------------------------------------------

def test_adahessian_bf16_and_fp16():
    xs, ys = tiny_batches(2)
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=adahessian).to_bf16()
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    # every weight AdaHessian steps moved: the bf16 Hessian estimate was neither zero nor skipped
    assert all(not torch.equal(b, p) for b, p in zip(before, learn.model.parameters()))
    learn.to_fp32().to_fp16()
    with pytest.raises(ValueError, match='to_fp16'): learn.fit(1, 1e-2)

def test_adahessian_refused_in_a_launched_run(monkeypatch):
    "Several processes (fastai's `num_distrib`, read from WORLD_SIZE): refused before the first batch; other optimizers train."
    import bnet_fastai.optimizers as bo
    monkeypatch.setattr(bo, 'num_distrib', lambda: 2)
    xs, ys = tiny_batches(1)
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=adahessian)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match='adahessian cannot train in a launched run of 2 processes'): learn.fit(1, 1e-2)
    assert all(torch.equal(b, p) for b, p in zip(before, learn.model.parameters())) # not one step taken
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=ranger)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)

def test_adahessian_double_backward_under_bf16_autocast():
    "The Hessian-vector products themselves under CPU bf16 autocast, outside any Learner."
    xs, ys = tiny_batches(1)
    net = tiny_net(); opt = AdaHessian(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.autocast('cpu', dtype=torch.bfloat16): loss = F.cross_entropy(net(xs).float(), ys)
    loss.backward(create_graph=True); opt.step()
    hs = [opt.state[p]['exp_hessian_diag_sq'] for p in net.parameters()]
    assert all(torch.isfinite(h).all() for h in hs) and any(h.abs().sum() > 0 for h in hs)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))

def test_hand_built_adahessian_says_what_to_do():
    "Outside a Learner, a step after a plain backward raises one line naming the fix."
    xs, ys = tiny_batches(1)
    net = tiny_net(); opt = adahessian(net.parameters())
    F.cross_entropy(net(xs), ys).backward()
    with pytest.raises(RuntimeError, match=r'create_graph=True') as e: opt.step()
    assert '\n' not in str(e.value)

def n_hessian_cbs(learn): return sum(isinstance(cb, HessianBackward) for cb in learn.cbs)

def hessian_estimated(learn):
    "AdaHessian's Hessian-diagonal state is non-zero only if the backward kept the gradients' graph."
    hs = [s['exp_hessian_diag_sq'] for s in learn.opt.opt.state.values() if 'exp_hessian_diag_sq' in s]
    return bool(hs) and any(h.abs().sum() > 0 for h in hs)

def _ckpt(learn):
    "A checkpoint with AdaHessian state, written by another Learner, loaded with its optimizer."
    other = Learner(learn.dls, tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=adahessian, splitter=learn.splitter, path=learn.path)
    with other.no_bar(), other.no_logging(): other.fit(1, 1e-2)
    other.save('ckpt', with_opt=True)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.load('ckpt', with_opt=True)
    assert not [w for w in ws if 'optimizer state' in str(w.message)] # fastai only warns when the state does not fit
    assert hessian_estimated(learn)

ENTRIES = {'fit': lambda l: l.fit(1, 1e-2), 'fit_one_cycle': lambda l: l.fit_one_cycle(1, 1e-2),
           'fit_flat_cos': lambda l: l.fit_flat_cos(1, 1e-2), 'fine_tune': lambda l: l.fine_tune(1, 1e-2, freeze_epochs=1),
           'lr_find': lambda l: l.lr_find(num_it=4, show_plot=False), 'freeze': lambda l: l.freeze(), 'load': _ckpt}

@pytest.mark.parametrize('entry', list(ENTRIES))
def test_adahessian_learner_adds_its_callback(entry, tmp_path):
    "Every fastai path that builds the optimizer gives `opt_func=adahessian` one `HessianBackward`, and training then estimates the Hessian."
    xs, ys = tiny_batches(4)
    split = lambda m: [list(m[:4].parameters()), list(m[4:].parameters())]
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=adahessian, splitter=split, path=tmp_path)
    assert n_hessian_cbs(learn) == 0
    with learn.no_bar(), learn.no_logging():
        ENTRIES[entry](learn)
        assert n_hessian_cbs(learn) == 1
        learn.unfreeze(); learn.fit(1, 1e-2, reset_opt=True)
    assert n_hessian_cbs(learn) == 1 and hessian_estimated(learn)

def test_user_hessian_backward_is_the_one_used():
    "A `HessianBackward` passed in `cbs` is not duplicated; taking it away brings back the one-line error."
    xs, ys = tiny_batches(2)
    hb = HessianBackward()
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=adahessian, cbs=hb)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-2); learn.fit(1, 1e-2, reset_opt=True)
        assert [cb for cb in learn.cbs if isinstance(cb, HessianBackward)] == [hb] and hessian_estimated(learn)
        learn.remove_cb(hb)
        with pytest.raises(RuntimeError, match=r'create_graph=True'): learn.fit(1, 1e-2)

@pytest.mark.parametrize('opt_func', ['fastai.Adam', 'ranger', 'lookahead(diffgrad)'])
def test_other_optimizers_get_no_callback(opt_func):
    "fastai's own optimizers and ours that need no graph: `create_opt` leaves the callbacks as fastai set them."
    import fastai.optimizer as fo
    of = fo.Adam if opt_func == 'fastai.Adam' else lookahead('diffgrad') if opt_func.startswith('lookahead') else get_opt(opt_func)
    xs, ys = tiny_batches(2)
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=of)
    before = [type(cb) for cb in learn.cbs] # `no_bar` puts back a new ProgressCallback, so compare types
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert [type(cb) for cb in learn.cbs] == before

def test_lookahead_adahessian_gets_its_callback():
    xs, ys = tiny_batches(2)
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=lookahead('adahessian', k=2))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert n_hessian_cbs(learn) == 1

def test_no_stack_inspection():
    "The opt_funcs find no Learner by looking up the call stack."
    src = (Path(bnet_fastai.__file__).parent).rglob('*.py')
    assert not [f.name for f in src if re.search(r'_getframe|inspect\.stack|currentframe', f.read_text())]

def test_lookahead_wraps_fastai_optimizers():
    import fastai.optimizer as fo
    xs, ys = tiny_batches(2)
    learn = Learner(tiny_dls(xs, ys), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=lookahead(fo.Adam, k=2))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert isinstance(learn.opt, fo.Lookahead) and learn.opt.k == 2 and learn.opt.count == 2

# ---- registry -------------------------------------------------------------------------------------------------

OPT_NAMES = ['ranger', 'ralamb', 'ranger_lars', 'adahessian', 'adamod', 'diffgrad', 'novograd']

def test_get_opt_names():
    "The names `bnet-train --opt` takes, each the opt_func of that name, in this order; a callable passes through."
    import bnet_fastai.optimizers as bo
    assert list(opt_registry) == OPT_NAMES
    assert all(get_opt(n) is getattr(bo, n) for n in OPT_NAMES)
    f = lookahead('ralamb', k=2)
    assert get_opt(f) is f

def test_register_opt():
    @register_opt('test_sgd')
    def sgd(params, lr=1e-3, **kwargs): return torch.optim.SGD(params, lr=lr)
    try: assert get_opt('test_sgd') is sgd
    finally: opt_registry.pop('test_sgd')
    with pytest.raises(ValueError, match='test_sgd'): get_opt('test_sgd')

# ---- bad input ------------------------------------------------------------------------------------------------

def test_bad_names():
    for f in (get_opt, lookahead):
        with pytest.raises(ValueError) as e: f('adamw9000')
        assert "'adamw9000'" in str(e.value) and all(k in str(e.value) for k in opt_registry)

# ---- convergence on real data ---------------------------------------------------------------------------------

CONVERGE = {'ranger': 3e-2, 'ralamb': 1e-2, 'ranger_lars': 3e-2, 'adahessian': 0.15, 'adamod': 1e-2,
            'diffgrad': 1e-2, 'novograd': 1e-2}

@pytest.mark.slow
@pytest.mark.parametrize('name', list(CONVERGE))
def test_digits_convergence(name):
    torch.manual_seed(0)
    learn = Learner(digits_dls(), xresnet18(n_out=10, norm="bnet", widen=0.5), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                    opt_func=get_opt(name)) # no cbs: adahessian's Learner adds HessianBackward itself
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, CONVERGE[name])
    acc = learn.validate()[1]
    print(f'{name}: validation accuracy {acc:.4f} after 3 epochs') # shown with `pytest -rP`
    assert acc >= 0.9, f'{name}: {acc:.3f}'
