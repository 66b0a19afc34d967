"`bnet-train`: the digits acceptance run, Imagenette's layout offline, determinism, Ctrl-C and resume, and bad input."
import json, os, re, shutil, signal, subprocess, sys, time, urllib.error
from pathlib import Path
import pandas as pd, pytest, torch
from fastai.data.external import fastai_cfg
from bnet_fastai.data import fake_imagenette, digits_dls
from bnet_fastai.models.xresnet import arch_registry
from bnet_fastai.train import main, train_config, train_run

root = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]), 'MPLBACKEND': 'Agg'}
DIGITS = ['--dataset', 'digits', '--arch', 'xresnet18', '--epochs', '5', '--size', '16'] # 16 px: digits are 8×8
FINAL = ['accuracy', 'top5', 'valid_loss', 'train_loss']

def bnet_train(*args, env=ENV):
    return subprocess.run(['bnet-train', *map(str, args)], env=env, capture_output=True, text=True)

_JIT_WARNING = "`torch.jit.script` is deprecated"
def err_lines(err:str) -> list:
    "stderr's lines, less the torch.jit FutureWarning that importing fastai prints (see `test_import_is_quiet`)."
    lines = err.strip().splitlines()
    i = next((i for i, l in enumerate(lines) if _JIT_WARNING in l), None)
    return lines if i is None else lines[:i] + lines[i+2:]  # the warning and its source line

def test_import_is_quiet():
    p = subprocess.run([sys.executable, '-c', 'import bnet_fastai.train'], env=ENV, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ''

@pytest.fixture(scope='module')
def digits_runs(tmp_path_factory):
    "The acceptance run, shared by the tests that compare against it."
    out = tmp_path_factory.mktemp('digits')/'r'
    return out, bnet_train(*DIGITS, '--norm', 'bn,bnet', '--out', out)

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
        assert list(hist.epoch) == [1, 2, 3, 4, 5]  # counted from 1, as in the plot
        assert hist.accuracy.iloc[-1] == pytest.approx(m['accuracy'])
    assert 'top-5 %' in summary
    assert f"summary: {out/'summary.md'}" in p.stdout and f"curves:  {out/'curves.png'}" in p.stdout
    # A finished run keeps its final weights only: the checkpoint with the optimizer state is gone
    for n in ('bn', 'bnet'): assert sorted(f.name for f in (out/f'{n}_s0').iterdir()) == ['history.csv', 'metrics.json', 'model.pth']

@pytest.mark.slow
def test_log_is_one_line_per_epoch(digits_runs):
    "stdout is a pipe here: one plain line per epoch, no progress-bar redraws, and nothing on stderr."
    out, p = digits_runs
    assert '\r' not in p.stdout and '█' not in p.stdout
    epochs = [l for l in p.stdout.splitlines() if l.startswith('epoch ')]
    assert [l.split()[1] for l in epochs] == [f'{i}/5' for i in range(1, 6)] * 2
    assert 'accuracy' in epochs[0] and 'train_loss' in epochs[0]
    assert err_lines(p.stderr) == []
@pytest.mark.slow
def test_reported_accuracy_is_the_saved_weights(digits_runs):
    "Recompute BNET's valid accuracy from model.pth with plain torch: the last epoch's weights are reported and kept."
    out, _ = digits_runs
    model = arch_registry['xresnet18'](n_out=10, norm='bnet')
    model.load_state_dict(torch.load(out/'bnet_s0'/'model.pth')); model.eval()
    dls = digits_dls(size=16)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in dls.valid)
    m = json.loads((out/'bnet_s0'/'metrics.json').read_text())
    assert correct/len(dls.valid_ds) == pytest.approx(m['accuracy'], abs=1e-6)

@pytest.mark.slow
def test_ctrl_c_and_resume(digits_runs, tmp_path):
    "SIGINT mid-epoch: one line, exit 130, the checkpoint kept; then --resume ends where the uninterrupted run did."
    full_out, _ = digits_runs
    out, args = tmp_path/'k', [*DIGITS, '--norm', 'bnet']
    run = out/'bnet_s0'
    # pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored across exec: give the run Ctrl-C back,
    # as a terminal would
    p = subprocess.Popen(['bnet-train', *args, '--out', str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rows = lambda: len((run/'history.csv').read_text().splitlines()) - 1 if (run/'history.csv').exists() else 0
    deadline = time.time() + 900
    while p.poll() is None and rows() < 2 and time.time() < deadline: time.sleep(0.1)
    time.sleep(0.5)  # into the third epoch
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130
    done = torch.load(run/'checkpoint.pth', weights_only=False)['epoch']
    assert 1 <= done < 5
    assert err_lines(err) == [f"interrupted during epoch {done+1}; rerun with --resume to continue"]
    # what --resume needs, and nothing half-written
    assert sorted(f.name for f in run.iterdir()) == ['checkpoint.pth', 'history.csv']
    assert sorted(f.name for f in out.iterdir()) == ['bnet_s0', 'config.json']

    r = bnet_train(*args, '--out', out, '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, full = [json.loads((o/'bnet_s0'/'metrics.json').read_text()) for o in (out, full_out)]
    for k in FINAL: assert resumed[k] == full[k], k
    cols = ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy']
    pd.testing.assert_frame_equal(pd.read_csv(run/'history.csv')[cols], pd.read_csv(full_out/'bnet_s0'/'history.csv')[cols])
    a, b = [torch.load(o/'bnet_s0'/'model.pth') for o in (out, full_out)]
    assert all(torch.equal(a[k], b[k]) for k in b)

def test_imagenette_cli_offline(nette_home, tmp_path):
    "Imagenette's real layout under a new FASTAI_HOME (no config.ini yet, as on a first run): `untar_data` finds it, no network needed, nothing on stderr."
    out, home = tmp_path/'nette', tmp_path/'home'
    shutil.copytree(nette_home/'data'/'imagenette2-160', home/'data'/'imagenette2-160')
    p = bnet_train('--dataset', 'imagenette', '--epochs', 1, '--size', 64, '--bs', 8, '--out', out,
                   env={**ENV, 'FASTAI_HOME': str(home)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (home/'config.ini').exists() and err_lines(p.stderr) == []
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
    sds = [torch.load(tmp_path/f'{i}'/'model.pth') for i in range(3)]
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    assert not all(torch.equal(sds[0][k], sds[2][k]) for k in sds[0])

BAD = [
    (dict(arch='resnet9'), r"unknown arch 'resnet9'; valid archs: .*xresnet18, .*xresnet50"),
    (dict(norm='bn,groupnorm'), r"unknown norm 'groupnorm'; valid names: bn, bnet"),
    (dict(opt='sgdx'), r"unknown optimizer 'sgdx'; valid names: ranger"),
    (dict(act='tanhx'), r"unknown activation 'tanhx'; valid names: relu"),
    (dict(dataset='mnist'), r"unknown dataset 'mnist'; valid datasets: imagenette, imagewoof, digits, or an existing folder"),
    (dict(sched='step'), r"unknown sched 'step'; valid scheds: one_cycle, flat_cos"),
    (dict(bnet_at='first'), r"unknown bnet_at='first'; valid choices: 'all', 'last'"),
    (dict(seeds='0,one'), r"seeds must be integers"),
]

@pytest.mark.parametrize('kw,msg', BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_bad_option(kw, msg, tmp_path, capsys):
    out = tmp_path/'out'
    with pytest.raises(SystemExit) as e: main(**{'dataset': 'digits', **kw}, out=str(out))
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)
    assert not out.exists()

def _truncate(tree):
    f = tree/'train'/'n03417042'/'n03417042_0.JPEG'
    data = f.read_bytes(); f.write_bytes(data[:len(data)//2])  # the header opens; the scan stops halfway
def _garbage(tree): (tree/'train'/'n03417042'/'broken.JPEG').write_bytes(b'not an image')
def _empty_class(tree): [f.unlink() for f in (tree/'val'/'n03425413').iterdir()]
def _no_val(tree): shutil.rmtree(tree/'val')

BAD_DATA = [  # (what is wrong, its message, extra options)
    (_truncate, r"cannot read image .*n03417042/n03417042_0\.JPEG \(truncated, or not an image\).*--skip-bad-images", []),
    (_garbage, r"cannot read image .*n03417042/broken\.JPEG", []),
    (_empty_class, r"class folder .*val/n03425413 holds no images", []),
    (_no_val, r"tree has no val/ folder", []),
    (None, r"the training set has 40 images, fewer than one batch of 64: pass --bs 40 or less", ['--bs', 64]),
]

@pytest.mark.parametrize('spoil,msg,opts', BAD_DATA, ids=['truncated', 'not_an_image', 'empty_class', 'no_val', 'under_one_batch'])
def test_bad_data_folder(spoil, msg, opts, nette_home, tmp_path):
    "Each bad folder: one error line naming what is wrong, exit status 2, and nothing written."
    tree = shutil.copytree(nette_home/'data'/'imagenette2-160', tmp_path/'tree')
    if spoil: spoil(tree)
    out = tmp_path/'out'
    p = bnet_train('--dataset', tree, '--epochs', 1, '--size', 32, '--bs', 8, *opts, '--out', out)
    assert p.returncode == 2 and re.search(msg, p.stderr), p.stderr[-3000:]
    assert len(err_lines(p.stderr)) == 1
    assert not out.exists()

def test_skip_bad_images(nette_home, tmp_path):
    "--skip-bad-images trains without the truncated file and names it in one warning line."
    tree = shutil.copytree(nette_home/'data'/'imagenette2-160', tmp_path/'tree')
    _truncate(tree)
    out = tmp_path/'out'
    p = bnet_train('--dataset', tree, '--norm', 'bn', '--epochs', 1, '--size', 32, '--bs', 8, '--skip-bad-images', '--out', out)
    assert p.returncode == 0, p.stderr[-3000:]
    [line] = err_lines(p.stderr)
    assert re.fullmatch(r"warning: skipping 1 image that cannot be read: .*n03417042_0\.JPEG", line)
    assert (out/'bn_s0'/'model.pth').exists()

def test_offline_download(use_home, tmp_path, capsys, monkeypatch):
    import fastdownload.core
    def offline(url, *args, **kwargs): raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(fastdownload.core, 'download_url', offline)
    use_home(tmp_path/'empty_home')
    out = tmp_path/'out'
    with pytest.raises(SystemExit) as e: main(dataset='imagenette', out=str(out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'offline' in err and '--dataset /data/imagenette2-160' in err
    assert not out.exists() and not list((tmp_path/'empty_home').rglob('*.lock'))

def test_existing_out_needs_resume(tmp_path, capsys):
    "A folder of earlier runs: continuing needs --resume, and a changed option is named with both values."
    out = tmp_path/'out'; out.mkdir()
    cfg = train_config(dataset='digits', epochs=5)
    (out/'config.json').write_text(json.dumps({k: v for k, v in cfg.items() if k != 'workers'}))
    before = sorted(out.rglob('*'))
    with pytest.raises(SystemExit): main(dataset='digits', out=str(out))
    assert 'pass --resume' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(dataset='digits', epochs=3, out=str(out), resume=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().endswith("its runs used other settings (epochs: 5 there, 3 now)")
    assert sorted(out.rglob('*')) == before

def test_console_script_exit_status_and_help(tmp_path):
    out = tmp_path/'out'
    p = bnet_train('--dataset', 'digits', '--opt', 'nope', '--out', out)
    assert p.returncode == 2 and "unknown optimizer 'nope'; valid names: ranger" in p.stderr and not out.exists()
    h = bnet_train('--help')
    for opt in ('--dataset', '--arch', '--norm', '--bnet-at', '--act', '--opt', '--epochs', '--lr', '--bs', '--size',
                '--sched', '--wd', '--seeds', '--mixup', '--bf16', '--channels-last', '--out', '--resume'):
        assert opt in h.stdout, opt
