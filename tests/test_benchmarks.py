"Smoke runs of the benchmark scripts at tiny sizes: they must keep running and print their tables (timings are not tested)."
import json, os, platform, re, runpy, statistics, subprocess, sys
from pathlib import Path
import pytest
from bnet_fastai.precision import cpu_bf16_native

ROOT = Path(__file__).resolve().parents[1]

def bench(script, *args):
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    return subprocess.run([sys.executable, str(ROOT/'benchmarks'/script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

def rows(out, first):
    "Table rows (split into cells) whose first cell is `first`."
    return [[c.strip() for c in l.strip().strip('|').split('|')] for l in out.splitlines() if l.startswith(f'| {first} ')]

def test_train_step_quick(tmp_path):
    png = tmp_path/'ts.png'
    # bf16 on a CPU without bf16 units runs oneDNN's emulation, minutes per step even at this size: fp32 only there
    precs = ['fp32', 'bf16'] if cpu_bf16_native() else ['fp32']
    r = bench('train_step.py', '--archs', 'xresnet18', '--size', 32, '--bs', 4, '--rounds', 2, '--norms', 'bn,bnet3',
              '--precision', ','.join(precs), '--png', png, '--json', tmp_path/'ts.json')
    assert r.returncode == 0, r.stderr
    # The default `--heap keep` is in force wherever glibc is the allocator.
    assert ('heap: freed memory kept' in r.stdout) == (platform.libc_ver()[0] == 'glibc')
    got = rows(r.stdout, 'xresnet18')
    # one table per precision, each with BN, both BNET paths and the floor (BN's step + the depthwise kernels alone)
    # the default path (lean=None) is marked: lean in fp32, plain under autocast
    defaults = {'fp32': [['bnet3', 'plain'], ['bnet3', 'lean (default)']], 'bf16': [['bnet3', 'plain (default)'], ['bnet3', 'lean']]}
    assert [row[1:3] for row in got] == [r for p in precs for r in [['bn', '-'], *defaults[p], ['floor', '-']]]
    raw = json.loads((tmp_path/'ts.json').read_text())
    meas = {(d['precision'], d['norm'], d['impl']): d for d in raw['rows']}
    assert raw['defaults'] == {p: ('lean' if p == 'fp32' else 'plain') for p in precs}
    assert 'precision fp32' in r.stdout and ('precision bf16 (autocast)' in r.stdout) == ('bf16' in precs)
    # The floor times one depthwise forward and backward for each BNET-3 of the model, counted here independently.
    from bnet_fastai.models.xresnet import xresnet18
    from bnet_fastai.layers import BNET
    n_bnet = sum(isinstance(l, BNET) for l in xresnet18(n_out=10, norm='bnet3').modules())
    assert n_bnet > 10 and [k[-1] for k in raw['floor_kernels']] == [n_bnet] * len(precs)
    for p, tab in zip(precs, (got[:4], got[4:])):
        m = lambda norm, impl='-': meas[(p, norm, impl)]
        # each printed step time is the median of its rounds; images/s is batch over it; ratios are of those numbers
        for row, key in zip(tab, [('bn', '-'), ('bnet3', 'plain'), ('bnet3', 'lean'), ('floor', '-')]):
            v = m(*key)
            assert len(v['times']) == 2
            if key[0] != 'floor': assert v['ms'] == pytest.approx(1e3 * statistics.median(v['times']))
            assert float(row[4]) == pytest.approx(raw['bs'] / (v['ms'] / 1e3), abs=0.06)
            if key[0] == 'bnet3':
                assert float(row[5]) == pytest.approx(v['ips'] / m('bn')['ips'], abs=6e-4)
                assert float(row[10]) == pytest.approx(v['peak'] / m('bn')['peak'], abs=6e-4)
                assert float(row[6]) == pytest.approx(m('floor')['ms'] / v['ms'], abs=6e-4)
        # the floor is BN's median step plus the kernels' own median, timed in the same rounds
        kern = m('floor')['ms'] - m('bn')['ms']
        assert kern == pytest.approx(1e3 * statistics.median(m('floor')['times'])) and kern > 0
        assert m('bn')['peak'] > 0 and m('bnet3', 'lean')['peak'] < m('bnet3', 'plain')['peak'] # lean keeps one activation less
        assert all(float(row[4]) > 0 for row in tab) # images/s
        # The lean path keeps only the norm's input, under autocast too: its saved activations equal BN's, the plain path's exceed them.
        saved = {(row[1], row[2].split()[0]): float(row[8]) for row in tab[:3]} # the floor row has no memory
        assert 0.9 < saved[('bnet3', 'lean')] <= 1.01 and saved[('bnet3', 'plain')] > saved[('bnet3', 'lean')]
        # in fp32 the extra activation is plain's x̂; under autocast the weights' bf16 copies, saved too, dwarf it at this size
        if p == 'fp32': assert saved[('bnet3', 'plain')] > 1.2 # at most BN's (a little less at tiny sizes)
    assert all(f'{p} xresnet18 BNET-3 {i}: P1 speed' in r.stdout for p in precs for i in ('plain', 'lean'))
    assert 'fp32 xresnet18 BNET-3 default (lean): speed' in r.stdout
    assert 'of the floor' in r.stdout and png.stat().st_size > 0

def script(name) -> dict:
    "A benchmark script's functions, loaded without running it (its argument checks run here, without a process each)."
    if str(ROOT/'benchmarks') not in sys.path: sys.path.insert(0, str(ROOT/'benchmarks')) # the scripts import their helpers
    return runpy.run_path(str(ROOT/'benchmarks'/name), run_name='benchmark')

def refused(parse, args, capsys) -> str:
    "What `parse(args)` prints as it exits with status 2."
    with pytest.raises(SystemExit) as e: parse(args)
    assert e.value.code == 2
    return capsys.readouterr().err

def test_train_step_rejects_fp16_on_cpu(capsys):
    parse = script('train_step.py')['parse_args']
    assert refused(parse, ['--quick', '--precision', 'fp32,fp16'], capsys).strip().splitlines()[-1].endswith("--precision fp16 needs --device cuda; on a CPU use fp32 or bf16")
    assert "unknown precision 'fp8'; valid choices: fp32, bf16, fp16" in refused(parse, ['--quick', '--precision', 'fp8'], capsys)

def test_inference_small(tmp_path):
    png = tmp_path/'inf.png'
    r = bench('inference.py', '--arch', 'xresnet18', '--size', 32, '--bs', 2, '--repeats', 1, '--formats', 'nchw', '--png', png)
    assert r.returncode == 0, r.stderr
    names = [row[0] for row in (rows(r.stdout, 'unfused') + rows(r.stdout, 'fused')) if len(row) == 2] # not the ratio rows
    assert names == ['unfused BN', 'unfused BNET', 'fused BN', 'fused BNET']
    ips = {row[0]: float(row[1]) for row in rows(r.stdout, 'unfused') + rows(r.stdout, 'fused') if len(row) == 2}
    ratio = {row[0]: float(row[1]) for row in rows(r.stdout, 'fused') + rows(r.stdout, 'unfused') if len(row) == 3}
    # the ratios are of the measured rates printed above them (to their rounding: rates to 0.05, ratios to 0.0005)
    for k, (num, den) in {'fused BNET / fused BN': ('fused BNET', 'fused BN'), 'fused BNET / unfused BNET': ('fused BNET', 'unfused BNET')}.items():
        q = ips[num] / ips[den]
        assert ratio[k] == pytest.approx(q, abs=q * (0.05/ips[num] + 0.05/ips[den]) + 5e-4), k
    assert png.stat().st_size > 0
    # The ceiling is unfused BNET's batch time over fused BN's plus one BN pass, from the printed numbers.
    bn_pass = float(rows(r.stdout, 'BN')[0][1])
    assert float(rows(r.stdout, 'depthwise')[0][1]) > 0 and bn_pass > 0
    ms = lambda k: 2 / ips[k] * 1e3
    assert float(rows(r.stdout, 'ceiling')[0][1]) == pytest.approx(ms('unfused BNET') / (ms('fused BN') + bn_pass), rel=0.05)

def test_optimizer_step_small():
    r = bench('optimizer_step.py', '--repeats', 1, '--warmup', 1)
    assert r.returncode == 0, r.stderr
    assert [row[0] for row in rows(r.stdout, 'bnet_fastai')] == ['bnet_fastai ranger', 'bnet_fastai ranger_lars']
    assert rows(r.stdout, 'fastai')[0][2] == '1.00×'

@pytest.mark.parametrize('args,bad', [(['--heap', 'bogus'], "'bogus'"), (['--archs', 'xresnet7'], "'xresnet7'")])
def test_bad_arguments_name_the_value_and_choices(args, bad, capsys):
    err = refused(script('train_step.py')['parse_args'], args, capsys)
    assert bad in err and ('keep' in err or 'xresnet50' in err) # the valid choices are listed

def test_inference_bad_arch_names_the_choices():
    r = bench('inference.py', '--arch', 'nope', '--png', '')
    assert r.returncode != 0 and "'nope'" in r.stderr and 'xresnet50' in r.stderr

@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the message given without CUDA')
def test_gpu_script_fails_fast_without_cuda(tmp_path):
    r = subprocess.run(['bash', str(ROOT/'benchmarks'/'gpu.sh'), str(tmp_path/'gpu.md')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == "benchmarks/gpu.sh: no CUDA device visible to torch; run it on a machine with an NVIDIA GPU"
    assert not (tmp_path/'gpu.md').exists()
