"`bnet-train`: the digits acceptance run, Imagenette's layout offline, determinism, kill-and-resume, and bad input."
import json, os, re, signal, subprocess, time, urllib.error
from pathlib import Path
import pandas as pd, pytest, torch
from fastai.data.external import fastai_cfg
from bnet_fastai.data import fake_imagenette, digits_dls
from bnet_fastai.models.xresnet import arch_registry
from bnet_fastai.train import main, train_config, train_run

root = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]), 'MPLBACKEND': 'Agg'}
DIGITS = ['--dataset', 'digits', '--arch', 'xresnet18', '--epochs', '5']
FINAL = ['accuracy', 'top5', 'valid_loss', 'train_loss']

def bnet_train(*args, env=ENV):
    return subprocess.run(['bnet-train', *map(str, args)], env=env, capture_output=True, text=True)

@pytest.fixture(scope='module')
def digits_runs(tmp_path_factory):
    "The acceptance run, shared by the tests that compare against it."
    out = tmp_path_factory.mktemp('digits')/'r'
    return out, bnet_train(*DIGITS, '--norm', 'bn,bnet', '--out', out)

@pytest.fixture(scope='module')
def nette_home(tmp_path_factory):
    home = tmp_path_factory.mktemp('fastai_home')
    fake_imagenette(home/'data'/'imagenette2-160', n_train=4, n_val=2)
    return home

@pytest.fixture
def use_home(monkeypatch):
    "Point fastai at another FASTAI_HOME inside this process (`fastai_cfg` caches the first one it reads)."
    def _use(home):
        monkeypatch.setenv('FASTAI_HOME', str(home)); fastai_cfg.cache_clear()
    yield _use
    fastai_cfg.cache_clear()

@pytest.mark.slow
def test_digits_bn_vs_bnet(digits_runs):
    out, p = digits_runs
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out/'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = (out/'summary.md').read_text()
    runs = {n: json.loads((out/f'{n}_s0'/'metrics.json').read_text()) for n in ('bn', 'bnet')}
    assert runs['bnet']['accuracy'] >= 0.97
    for n, m in runs.items():
        row = next(l for l in summary.splitlines() if l.startswith(f'| {n} |'))
        assert f"{m['accuracy']*100:.2f}" in row and f"{m['valid_loss']:.4f}" in row
        assert row in p.stdout  # the comparison table is printed
        hist = pd.read_csv(out/f'{n}_s0'/'history.csv')
        assert list(hist.epoch) == list(range(5))
        assert hist.accuracy.iloc[-1] == pytest.approx(m['accuracy'])
    assert 'top-5 %' in summary

@pytest.mark.slow
def test_reported_accuracy_is_the_checkpoints(digits_runs):
    "Recompute BNET's valid accuracy from its checkpoint with plain torch: the last epoch's weights are reported."
    out, _ = digits_runs
    ck = torch.load(out/'bnet_s0'/'checkpoint.pth', weights_only=False)
    assert ck['epoch'] == 5 and len(ck['opt']['state']) > 0
    model = arch_registry['xresnet18'](n_out=10, norm='bnet')
    model.load_state_dict(ck['model']); model.eval()
    dls = digits_dls()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in dls.valid)
    m = json.loads((out/'bnet_s0'/'metrics.json').read_text())
    assert correct/len(dls.valid_ds) == pytest.approx(m['accuracy'], abs=1e-6)

@pytest.mark.slow
def test_kill_and_resume(digits_runs, tmp_path):
    "SIGKILL mid-epoch, then --resume: the final metrics and the history equal the uninterrupted run's."
    full_out, _ = digits_runs
    out, args = tmp_path/'k', [*DIGITS, '--norm', 'bnet']
    run = out/'bnet_s0'
    p = subprocess.Popen(['bnet-train', *args, '--out', str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = lambda: len((run/'history.csv').read_text().splitlines()) - 1 if (run/'history.csv').exists() else 0
    deadline = time.time() + 900
    while p.poll() is None and rows() < 2 and time.time() < deadline: time.sleep(0.1)
    time.sleep(0.5)  # into the third epoch
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    done = torch.load(run/'checkpoint.pth', weights_only=False)['epoch']
    assert 1 <= done < 5 and not (run/'metrics.json').exists()

    r = bnet_train(*args, '--out', out, '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, full = [json.loads((o/'bnet_s0'/'metrics.json').read_text()) for o in (out, full_out)]
    for k in FINAL: assert resumed[k] == full[k], k
    cols = ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy']
    pd.testing.assert_frame_equal(pd.read_csv(run/'history.csv')[cols], pd.read_csv(full_out/'bnet_s0'/'history.csv')[cols])

def test_imagenette_cli_offline(nette_home, tmp_path):
    "Imagenette's real layout under FASTAI_HOME: `untar_data` finds it, no network needed."
    out = tmp_path/'nette'
    p = bnet_train('--dataset', 'imagenette', '--epochs', 1, '--size', 64, '--bs', 8, '--out', out,
                   env={**ENV, 'FASTAI_HOME': str(nette_home)})
    assert p.returncode == 0, p.stderr[-3000:]
    for n in ('bn', 'bnet'):
        m = json.loads((out/f'{n}_s0'/'metrics.json').read_text())
        assert m['epochs'] == 1 and 0 <= m['top5'] <= 1
    assert (out/'summary.md').exists() and (out/'curves.png').exists()

def test_same_seed_same_metrics(nette_home, use_home, tmp_path):
    "Two runs with the same seed (random crops, flips, shuffling) end with the same weights and metrics on CPU."
    use_home(nette_home)
    cfg = train_config(dataset='imagenette', norm='bnet', epochs=1, size=32, bs=8, workers=0)
    ms = [train_run(cfg, 'bnet', seed, tmp_path/f'{i}') for i, seed in enumerate((0, 0, 1))]
    for k in FINAL: assert ms[0][k] == ms[1][k], k
    sds = [torch.load(tmp_path/f'{i}'/'checkpoint.pth', weights_only=False)['model'] for i in range(3)]
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    assert not all(torch.equal(sds[0][k], sds[2][k]) for k in sds[0])

BAD = [
    (dict(arch='resnet9'), r"unknown arch 'resnet9'; valid archs: .*xresnet18, .*xresnet50"),
    (dict(norm='bn,groupnorm'), r"unknown norm 'groupnorm'; valid names: bn, bnet"),
    (dict(opt='sgdx'), r"unknown optimizer 'sgdx'; valid names: ranger"),
    (dict(act='tanhx'), r"unknown activation 'tanhx'; valid names: relu"),
    (dict(dataset='mnist'), r"unknown dataset 'mnist'; valid datasets: imagenette, imagewoof, digits, or an existing folder"),
    (dict(sched='step'), r"unknown sched 'step'; valid scheds: one_cycle, flat_cos"),
    (dict(bnet_at='first'), r"unknown bnet_at 'first'; valid bnet_ats: all, last"),
    (dict(seeds='0,one'), r"seeds must be integers"),
]

@pytest.mark.parametrize('kw,msg', BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_bad_option(kw, msg, tmp_path, capsys):
    out = tmp_path/'out'
    with pytest.raises(SystemExit) as e: main(**{'dataset': 'digits', **kw}, out=str(out))
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)
    assert not out.exists()

def test_bad_data_folder(nette_home, tmp_path, capsys):
    import shutil
    tree = shutil.copytree(nette_home/'data'/'imagenette2-160', tmp_path/'tree')
    cases = []
    bad = tree/'train'/'n03417042'/'broken.JPEG'; bad.write_bytes(b'not an image')
    cases.append(r"cannot read image .*n03417042/broken\.JPEG")
    for case in range(3):
        out = tmp_path/f'out{case}'
        if case == 1:
            bad.unlink(); [f.unlink() for f in (tree/'val'/'n03425413').iterdir()]
            cases.append(r"class folder .*val/n03425413 holds no images")
        if case == 2:
            shutil.rmtree(tree/'val'); cases.append(r"tree has no val/ folder")
        with pytest.raises(SystemExit) as e: main(dataset=str(tree), out=str(out))
        assert e.value.code == 2 and re.search(cases[case], capsys.readouterr().err)
        assert not out.exists()

def test_offline_download(use_home, tmp_path, capsys, monkeypatch):
    import fastdownload.core
    def offline(url, *args, **kwargs): raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(fastdownload.core, 'download_url', offline)
    use_home(tmp_path/'empty_home')
    out = tmp_path/'out'
    with pytest.raises(SystemExit) as e: main(dataset='imagenette', out=str(out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'offline' in err and '--dataset /data/imagenette2-160' in err
    assert not out.exists()

def test_existing_out_needs_resume(tmp_path, capsys):
    out = tmp_path/'out'; out.mkdir(); (out/'config.json').write_text(json.dumps(dict(dataset='digits')))
    before = sorted(out.rglob('*'))
    with pytest.raises(SystemExit): main(dataset='digits', out=str(out))
    assert 'pass --resume' in capsys.readouterr().err
    with pytest.raises(SystemExit): main(dataset='digits', out=str(out), resume=True)
    assert "cannot resume" in capsys.readouterr().err and sorted(out.rglob('*')) == before

def test_console_script_exit_status_and_help(tmp_path):
    out = tmp_path/'out'
    p = bnet_train('--dataset', 'digits', '--opt', 'nope', '--out', out)
    assert p.returncode == 2 and "unknown optimizer 'nope'; valid names: ranger" in p.stderr and not out.exists()
    h = bnet_train('--help')
    for opt in ('--dataset', '--arch', '--norm', '--bnet-at', '--act', '--opt', '--epochs', '--lr', '--bs', '--size',
                '--sched', '--wd', '--seeds', '--mixup', '--bf16', '--channels-last', '--out', '--resume'):
        assert opt in h.stdout, opt
