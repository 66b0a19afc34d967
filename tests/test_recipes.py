"`--recipe leaderboard` and the options it sets: values against the leaderboard runs', where each option acts, and the published row in summary.md."
import itertools, json, os, statistics, subprocess
from pathlib import Path
import pandas as pd, pytest, torch, torch.nn.functional as F
from torch import nn
import fastai.vision.models.xresnet as fx
from fastai.data.external import fastai_cfg
from fastai.layers import MaxPool, SimpleSelfAttention
from fastai.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat
from bnet_fastai.data import fake_imagenette, digits_dls
from bnet_fastai.models.xresnet import arch_registry
from bnet_fastai.recipes import leaderboard, published_entry
from bnet_fastai.config import train_config, TRAIN_DEFAULTS
from bnet_fastai.cli import train_parser
from bnet_fastai.recipes import leaderboard_recipe
from bnet_fastai.train import build_learner, get_dls
from bnet_fastai.reports import write_outputs, summary_table

root = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]), 'MPLBACKEND': 'Agg'}

# The leaderboard runs' options. Source: https://github.com/fastai/imagenette/blob/master/2020-01-train.md
#   "--lr 8e-3 --sqrmom 0.99 --mom 0.95 --eps 1e-6 --bs 64 --opt ranger --sa 1 --fp16 1 --arch xse_resnext50 --pool MaxPool";
#   "The 80 and 200 epoch runs use mixup. 5 and 20 do not use mixup." (alpha 0.2: the README's earlier `--mixup 0.2` commands)
# and fastai's nbs/examples/train_imagenette.py: act_fn='Mish', wd=1e-2, learn.fit_flat_cos, loss_func=LabelSmoothingCrossEntropy()
SCRIPT = dict(arch='xse_resnext50', act='mish', sa=True, pool='max', opt='ranger', mom=0.95, sqr_mom=0.99, eps=1e-6,
              sched='flat_cos', lr=8e-3, wd=1e-2, bs=64, label_smoothing=LabelSmoothingCrossEntropy().eps)
SCRIPT_MIXUP = {5: 0., 20: 0., 80: 0.2, 200: 0.2}

@pytest.mark.parametrize('dataset,size,epochs', itertools.product(('imagenette', 'imagewoof'), (128, 192, 256), (5, 20, 80, 200)))
def test_recipe_values_are_the_leaderboard_runs(dataset, size, epochs):
    cfg = train_config(recipe='leaderboard', dataset=dataset, size=size, epochs=epochs)
    assert {k: cfg[k] for k in SCRIPT} == SCRIPT
    assert (cfg.mixup, cfg.size, cfg.epochs, cfg.overrides) == (SCRIPT_MIXUP[epochs], size, epochs, {})

def test_recipe_sets_only_defined_options():
    "A recipe's values are options of `TRAIN_DEFAULTS` (defined once, in config), never new ones."
    assert set(leaderboard_recipe('imagenette', 128, 80)) <= set(TRAIN_DEFAULTS)

def test_explicit_options_override_the_recipe():
    cfg = train_config(recipe='leaderboard', dataset='imagewoof', lr=1e-3, arch='xresnet18', sa=False, label_smoothing=0.)
    assert (cfg.lr, cfg.arch, cfg.sa, cfg.label_smoothing) == (1e-3, 'xresnet18', False, 0.)
    assert cfg.overrides == dict(lr=1e-3, arch='xresnet18', sa=False, label_smoothing=0.)
    assert {k: cfg[k] for k in ('act', 'pool', 'mom', 'sqr_mom', 'eps', 'bs')} == {k: SCRIPT[k] for k in ('act', 'pool', 'mom', 'sqr_mom', 'eps', 'bs')}
    # without a recipe, bnet-train's own defaults
    plain = train_config(dataset='imagewoof')
    assert (plain.arch, plain.lr, plain.sa, plain.pool, plain.label_smoothing, plain.mom, plain.recipe) == ('xresnet18', 4e-3, False, 'avg', 0., None, 'none')
    assert {k: plain[k] for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS

def test_cli_flags_parse_to_explicit_values():
    p = train_parser()
    a = p.parse_args(['--recipe', 'leaderboard', '--sa', '--pool', 'avg', '--mom', '0.9', '--label-smoothing', '0.2'])
    assert (a.recipe, a.sa, a.pool, a.mom, a.label_smoothing, a.lr, a.sqr_mom) == ('leaderboard', True, 'avg', 0.9, 0.2, None, None)
    assert p.parse_args(['--sa', 'False']).sa is False and p.parse_args([]).sa is None

@pytest.mark.parametrize('kw,msg', [
    (dict(recipe='imagenet'), "unknown recipe 'imagenet'; valid recipes: none, leaderboard"),
    (dict(recipe='leaderboard', dataset='digits'), "recipe 'leaderboard' is for imagenette or imagewoof"),
    (dict(pool='median'), "unknown pool 'median'; valid pools: avg, max"),
    (dict(label_smoothing=1.5), "label_smoothing=1.5: must be in [0, 1)"),
    (dict(mom=1.2), "mom=1.2: must be in [0, 1)"),
    (dict(eps=0.), "eps=0.0: must be > 0"),
    (dict(arch='mininet', sa=True), "arch 'mininet' has no sa option; archs that have it: xresnet18"),
])
def test_bad_options(kw, msg):
    import bnet_fastai.models.zoo # puts mininet into arch_registry
    with pytest.raises(ValueError) as e: train_config(**{'dataset': 'digits', **kw})
    assert msg in str(e.value)

@pytest.fixture(scope='module')
def digits():
    return digits_dls(32, 64)

def test_sa_and_pool_reach_the_model(digits):
    "`sa` and `pool` build the same XResNet as fastai's own builder with the same arguments."
    learn = build_learner(train_config(dataset='digits', precision='fp32', sa=True, pool='max'), 'bn', digits)
    ref = fx.xresnet18(n_out=10, sa=True, pool=MaxPool)
    types = lambda model: [type(m) for m in model.modules()][1:] # the model itself is our `NormXResNet`, a subclass of fastai's
    assert isinstance(learn.model, fx.XResNet) and types(learn.model) == types(ref)
    assert sum(isinstance(m, SimpleSelfAttention) for m in learn.model.modules()) == 1
    plain = build_learner(train_config(dataset='digits', precision='fp32'), 'bn', digits).model
    assert types(plain) == types(fx.xresnet18(n_out=10))
    n_pools = lambda model, t: sum(isinstance(m, t) for m in model.modules())
    # one MaxPool2d in the stem; pool='max' puts one on each of the three downsampling shortcuts, in place of AvgPool2d
    assert (n_pools(plain, nn.MaxPool2d), n_pools(plain, nn.AvgPool2d), n_pools(plain, SimpleSelfAttention)) == (1, 3, 0)
    assert (n_pools(learn.model, nn.MaxPool2d), n_pools(learn.model, nn.AvgPool2d)) == (4, 0)

def test_label_smoothing_reaches_the_loss(digits):
    eps = 0.3
    learn = build_learner(train_config(dataset='digits', precision='fp32', label_smoothing=eps), 'bnet', digits)
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat)
    x, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    ref = (1 - eps) * F.cross_entropy(x, y) + eps * (-F.log_softmax(x, 1)).mean() # smoothing spread evenly over 10 classes
    assert float(learn.loss_func(x, y)) == pytest.approx(float(ref), rel=1e-5)
    assert not isinstance(build_learner(train_config(dataset='digits', precision='fp32'), 'bnet', digits).loss_func, LabelSmoothingCrossEntropyFlat)

@pytest.mark.parametrize('opt', ['ranger', 'ralamb', 'novograd'])
def test_mom_sqr_mom_eps_reach_the_optimizer(digits, opt):
    learn = build_learner(train_config(dataset='digits', precision='fp32', opt=opt, mom=0.9, sqr_mom=0.98, eps=1e-7), 'bn', digits)
    learn.create_opt()
    assert all((h['mom'], h['sqr_mom'], h['eps']) == (0.9, 0.98, 1e-7) for h in learn.opt.hypers)
    assert all((pg['betas'][:2], pg['eps']) == ((0.9, 0.98), 1e-7) for pg in learn.opt.opt.param_groups)
    default = build_learner(train_config(dataset='digits', precision='fp32', opt=opt), 'bn', digits)
    default.create_opt()
    assert default.opt.opt.param_groups[0]['eps'] != 1e-7

@pytest.mark.slow
def test_leaderboard_recipe_cli_on_fake_imagenette(nette_home, use_home, tmp_path):
    out = tmp_path/'lb'
    p = subprocess.run(['bnet-train', '--recipe', 'leaderboard', '--dataset', 'imagenette', '--epochs', '1', '--size', '64',
                        '--bs', '8', '--precision', 'fp32', '--out', str(out)], env={**ENV, 'FASTAI_HOME': str(nette_home)},
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((out/'config.json').read_text())
    assert {k: cfg[k] for k in SCRIPT if k != 'bs'} == {k: v for k, v in SCRIPT.items() if k != 'bs'}
    assert (cfg['recipe'], cfg['bs'], cfg['overrides'], cfg['mixup']) == ('leaderboard', 8, {'bs': 8}, 0.)
    assert any('validation' in n for n in cfg['recipe_notes'])
    # the trained weights are those of the recipe's model, self-attention included
    sd = torch.load(out/'bnet_s0'/'model.pth')
    build = lambda sa: arch_registry['xse_resnext50'](n_out=10, norm='bnet', act_cls='mish', pool=MaxPool, sa=sa)
    build(True).load_state_dict(sd)
    with pytest.raises(RuntimeError, match='Unexpected key'): build(False).load_state_dict(sd)
    # no published entry at 64 px and 1 epoch
    summary = (out/'summary.md').read_text()
    assert 'Published leaderboard: imagenette, 64 px, 1 epoch\n' in summary and 'None:' in summary
    assert summary.startswith('# xse_resnext50 on imagenette: 1 epoch, flat_cos, ranger, lr 0.008, bs 8, size 64,')
    # the same options in-process: the model and the loss the run was built with
    use_home(nette_home)
    c = train_config(recipe='leaderboard', dataset='imagenette', epochs=1, size=64, bs=8, workers=0, precision='fp32')
    assert {k: v for k, v in c.items() if k != 'workers'} == cfg
    learn = build_learner(c, 'bnet', get_dls(c))
    assert sum(isinstance(m, SimpleSelfAttention) for m in learn.model.modules()) == 1
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.eps == 0.1

def _fake_runs(out:Path, cfg, accs:dict) -> dict:
    "Write a history per run and return the final metrics, as `train` would, without training."
    results = {}
    for n, acc in accs.items():
        results[n] = []
        for s, a in zip(cfg.seeds, acc):
            (out/f'{n}_s{s}').mkdir(parents=True)
            pd.DataFrame(dict(epoch=range(cfg.epochs), train_loss=1., valid_loss=1., accuracy=a, top_k_accuracy=1., time='00:01')
                        ).to_csv(out/f'{n}_s{s}'/'history.csv', index=False)
            results[n].append(dict(accuracy=a, top5=1., valid_loss=1., s_per_epoch=1.))
    return results

def test_summary_prints_the_published_row(tmp_path):
    cfg = train_config(dataset='imagenette', size=128, epochs=5, norm='bn,bnet', seeds='0,1,2')
    accs = dict(bn=[0.861, 0.874, 0.866], bnet=[0.870, 0.859, 0.881])
    runs = _fake_runs(tmp_path, cfg, accs)
    table = write_outputs(tmp_path, cfg, runs)
    summary = (tmp_path/'summary.md').read_text()
    assert table.startswith(summary_table(runs)) and summary_table(runs) in summary # the table, then the findings
    for n, a in accs.items():
        mean, sd = statistics.mean(a)*100, statistics.stdev(a)*100
        assert f"| {n} | 3 | {mean:.2f} ± {sd:.2f} | 87.43 | 5 |" in summary
    assert 'Published leaderboard: imagenette, 128 px, 5 epochs' in summary

@pytest.mark.parametrize('dataset,size,epochs', [('imagenette', 128, 3), ('imagewoof', 160, 5)])
def test_summary_without_a_published_entry(tmp_path, dataset, size, epochs):
    cfg = train_config(dataset=dataset, size=size, epochs=epochs, norm='bn', seeds='0')
    write_outputs(tmp_path, cfg, _fake_runs(tmp_path, cfg, dict(bn=[0.7])))
    summary = (tmp_path/'summary.md').read_text()
    assert published_entry(dataset, size, epochs) is None
    assert f'Published leaderboard: {dataset}, {size} px, {epochs} epochs\n\nNone:' in summary
    assert 'published %' not in summary
    assert not any(f"{a:.2f}" in summary for a in leaderboard().accuracy)

def test_summary_digits_has_no_leaderboard_section(tmp_path):
    cfg = train_config(dataset='digits', epochs=2, norm='bn')
    write_outputs(tmp_path, cfg, _fake_runs(tmp_path, cfg, dict(bn=[0.9])))
    assert 'Published leaderboard' not in (tmp_path/'summary.md').read_text()

def test_leaderboard_table():
    "Every size and epoch count of both leaderboards, once each, with the numbers the project's reference quotes."
    lb = leaderboard()
    assert sorted(map(tuple, lb[['dataset', 'size', 'epochs']].values.tolist())) == sorted(
        itertools.product(('imagenette', 'imagewoof'), (128, 192, 256), (5, 20, 80, 200)))
    quoted = {('imagenette', 128, 5): 87.43, ('imagenette', 128, 20): 91.57, ('imagenette', 128, 80): 93.55,
              ('imagenette', 128, 200): 94.24, ('imagewoof', 128, 5): 76.61}
    for k, v in quoted.items(): assert published_entry(*k)['accuracy'] == v
    assert set(lb.runs) == {1, 5} and lb.url.str.startswith('http').all()
    assert published_entry('/data/imagewoof2-320', 192, 20)['accuracy'] == 88.37
