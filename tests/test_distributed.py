"`bnet-train` in 2 CPU processes (gloo, loopback): SyncBatchNorm, rank-0-only outputs, whole-set metrics, kill and resume."
import copy, os, signal, subprocess
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn
from bnet_fastai.distributed import launch_cmd, CPUSyncBatchNorm
from bnet_fastai.data import digits_dls
from bnet_fastai.models.xresnet import xresnet18

ROOT = Path(__file__).resolve().parents[1]
CMD = ['-m', 'bnet_fastai.cli', '--dataset', 'digits', '--arch', 'xresnet18', '--norm', 'bnet', '--precision', 'fp32', '--size', '16', '--epochs', '1'] # 16 px: digits are 8×8
pytestmark = pytest.mark.slow

@pytest.fixture(scope='module', autouse=True)
def _launch_tmp(tmp_path_factory):
    "torchrun makes a `torchelastic_*` folder in the temp dir for each launch: keep them inside pytest's own temp dir."
    old = os.environ.get('TMPDIR')
    os.environ['TMPDIR'] = str(tmp_path_factory.mktemp('torchrun'))
    yield
    if old is None: os.environ.pop('TMPDIR', None)
    else: os.environ['TMPDIR'] = old

def _env() -> dict:
    return {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}

def _launch(args, stats_dir=None, timeout=400) -> subprocess.CompletedProcess:
    "Run `args` in 2 processes; torchrun exits 0 only if every rank did. With `stats_dir`, through the norm-statistics probe."
    if stats_dir: args = [str(ROOT/'tests'/'_norm_stats_probe.py'), str(stats_dir), *args[2:]] # args[:2] is `-m bnet_fastai.cli`
    return subprocess.run(launch_cmd(2, *args), env=_env(), capture_output=True, text=True, timeout=timeout)

def _files(d:Path) -> list: return sorted(str(p.relative_to(d)) for p in d.rglob('*') if p.is_file())

def _valid_eval(weights:Path):
    "Accuracy and loss of the saved final weights on the whole digits validation set, in this one process."
    model = xresnet18(n_out=10, norm='bnet').eval()
    model.load_state_dict(torch.load(weights))
    correct, loss, n = 0, 0., 0
    with torch.no_grad():
        for xb, yb in digits_dls(16, 64).valid:
            xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)
            p = model(xb)
            correct += (p.argmax(1) == yb).sum().item(); loss += nn.functional.cross_entropy(p, yb, reduction='sum').item(); n += len(yb)
    return correct, loss / n, n

@pytest.fixture(scope='module')
def sync_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('sync')
    res = _launch(CMD + ['--sync-bn', '--out', str(d/'out')], stats_dir=d/'stats')
    assert res.returncode == 0, res.stderr[-3000:]
    return d/'out', d/'stats', res

def _stats(stats_dir:Path):
    return [torch.load(stats_dir/f'bnet_s0_rank{r}.pt') for r in (0, 1)]

def test_sync_bn_run_both_ranks_finish(sync_run):
    out, stats_dir, res = sync_run
    # Each rank saved its statistics after training, and torchrun returned 0: both ranks exited 0
    test_names = sorted(p.name for p in stats_dir.iterdir())
    assert test_names == ['bnet_s0_rank0.pt', 'bnet_s0_rank1.pt']
    assert res.stdout.count('| bnet | 1 |') == 1 # the table is printed once, by rank 0

def test_one_log_one_set_of_checkpoints(sync_run):
    out, _, _ = sync_run
    assert _files(out) == ['bnet_s0/history.csv', 'bnet_s0/kernels.csv', 'bnet_s0/metrics.json', 'bnet_s0/model.pth',
                           'config.json', 'curves.png', 'kernels.png', 'summary.md']
    h = pd.read_csv(out/'bnet_s0'/'history.csv')
    assert list(h.epoch) == [1] # one writer: one header, one row

def test_sync_bn_running_stats_identical_across_ranks(sync_run):
    s0, s1 = _stats(sync_run[1])
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in xresnet18(n_out=10, norm='bnet').modules())
    assert list(s0['types'].values()) == [CPUSyncBatchNorm.__name__] * n_bn # BNET's inner BatchNorms included
    assert s0['stats'].keys() == s1['stats'].keys() and len(s0['stats']) == 3 * n_bn
    for k, v in s0['stats'].items(): assert torch.equal(v, s1['stats'][k]), k
    assert all(v.item() > 0 for k, v in s0['stats'].items() if k.endswith('num_batches_tracked'))

def test_valid_metrics_cover_every_item_once(sync_run):
    "The logged metrics equal a one-process evaluation of the final weights on all 359 items (fastai's padding makes 360)."
    out = sync_run[0]
    h = pd.read_csv(out/'bnet_s0'/'history.csv').iloc[-1]
    correct, loss, n = _valid_eval(out/'bnet_s0'/'model.pth')
    assert n == 359
    assert h.accuracy == pytest.approx(correct / n, abs=1e-6)
    assert h.valid_loss == pytest.approx(loss, rel=1e-4)

def test_without_sync_bn(tmp_path):
    res = _launch(CMD + ['--out', str(tmp_path/'out')], stats_dir=tmp_path/'stats')
    assert res.returncode == 0, res.stderr[-3000:]
    assert _files(tmp_path/'out')[:4] == ['bnet_s0/history.csv', 'bnet_s0/kernels.csv', 'bnet_s0/metrics.json', 'bnet_s0/model.pth']
    s0, s1 = _stats(tmp_path/'stats')
    assert set(s0['types'].values()) == {'BatchNorm2d'}
    # Without synchronisation the last step's local statistics leave the ranks apart
    assert any(not torch.equal(v, s1['stats'][k]) for k, v in s0['stats'].items() if 'running' in k)

def test_sigkill_mid_epoch_then_resume(tmp_path):
    "SIGKILL to the launcher and both ranks at epoch 2, batch 2, sent by rank 0 itself (no timing), then --resume."
    out, ckpt = tmp_path/'out', tmp_path/'out'/'bnet_s0'/'checkpoint.pth'
    args = CMD[:-1] + ['2', '--sync-bn', '--out', str(out)]
    probe = [str(ROOT/'tests'/'_interrupt_probe.py'), '2', '2', *args[2:]] # args[:2] is `-m bnet_fastai.cli`
    res = subprocess.run(launch_cmd(2, *probe), env={**_env(), 'PROBE_KILL_LAUNCH': '1'}, capture_output=True, text=True, timeout=400)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    state = torch.load(ckpt, weights_only=False)
    assert state['epoch'] == 1 # killed during the second epoch
    first = pd.read_csv(out/'bnet_s0'/'history.csv')
    assert list(first.epoch) == [1]
    res = _launch(args + ['--resume'])
    assert res.returncode == 0, res.stderr[-3000:]
    h = pd.read_csv(out/'bnet_s0'/'history.csv')
    assert list(h.epoch) == [1, 2]
    pd.testing.assert_series_equal(h.iloc[0].drop('time'), first.iloc[0].drop('time'))
    assert not ckpt.exists() # the finished run keeps its weights only
    assert (out/'bnet_s0'/'model.pth').exists() and (out/'bnet_s0'/'metrics.json').exists() and (out/'summary.md').exists()

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cpu_sync_bn_under_autocast(dtype, monkeypatch, tmp_path):
    "`--bf16 --sync-bn` on gloo: `CPUSyncBatchNorm` in a one-process group under autocast matches BatchNorm there, in the input's dtype."
    import torch.distributed as dist
    # a file store: no port to pick and then bind
    dist.init_process_group('gloo', init_method=(tmp_path/'store').as_uri(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(CPUSyncBatchNorm, '_syncs', lambda self: True) # the synchronised path, though the group has one process
        torch.manual_seed(0)
        conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        sbn = CPUSyncBatchNorm.from_bn(copy.deepcopy(bn))
        x = torch.randn(4, 3, 8, 8)
        with torch.autocast('cpu', dtype=dtype):
            h = conv(x)
            want, got = bn(h), sbn(h)
        assert h.dtype == dtype and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(sbn.running_mean, bn.running_mean, atol=1e-2, rtol=1e-2)
    finally: dist.destroy_process_group()
