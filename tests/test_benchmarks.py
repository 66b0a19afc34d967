"Smoke runs of the benchmark scripts at tiny sizes: they must keep running and print their tables (timings are not tested)."
import os, platform, re, subprocess, sys
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
    r = bench('train_step.py', '--archs', 'xresnet18', '--size', 32, '--bs', 4, '--rounds', 1, '--norms', 'bn,bnet3',
              '--precision', ','.join(precs), '--png', png)
    assert r.returncode == 0, r.stderr
    # The default `--heap keep` is in force wherever glibc is the allocator.
    assert ('heap: freed memory kept' in r.stdout) == (platform.libc_ver()[0] == 'glibc')
    got = rows(r.stdout, 'xresnet18')
    # one table per precision, each with BN, both BNET paths and the floor (BN's step + the depthwise kernels alone)
    assert [row[1:3] for row in got] == [['bn', '-'], ['bnet3', 'plain'], ['bnet3', 'lean'], ['floor', '-']] * len(precs)
    assert 'precision fp32' in r.stdout and ('precision bf16 (autocast)' in r.stdout) == ('bf16' in precs)
    for tab in (got[:4], got[4:]):
        if not tab: continue
        assert all(float(row[4]) > 0 for row in tab) # images/s
        assert tab[0][5] == tab[0][8] == tab[0][10] == '1.000' # BN is its own reference
        # the floor is BN's step plus more kernels: slower than BN; BNET's fraction of it is printed
        assert float(tab[3][3]) > float(tab[0][3]) and float(tab[1][6]) > 0 and tab[0][6] == '–'
        # The lean path keeps only the norm's input, under autocast too: its saved activations equal BN's, the plain path's exceed them.
        saved = {tuple(row[1:3]): float(row[8]) for row in tab[:3]} # the floor row has no memory
        assert 0.9 < saved[('bnet3', 'lean')] <= 1.01 and saved[('bnet3', 'plain')] > 1.2 # at most BN's (a little less at tiny sizes)
    assert all(f'{p} xresnet18 BNET-3 {i}: P1 speed' in r.stdout for p in precs for i in ('plain', 'lean'))
    assert 'of the floor' in r.stdout and png.stat().st_size > 0

def test_train_step_rejects_fp16_on_cpu():
    r = bench('train_step.py', '--quick', '--precision', 'fp32,fp16')
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--precision fp16 needs --device cuda; on a CPU use fp32 or bf16")
    r = bench('train_step.py', '--quick', '--precision', 'fp8')
    assert r.returncode == 2 and "unknown precision 'fp8'; valid choices: fp32, bf16, fp16" in r.stderr

def test_inference_small(tmp_path):
    png = tmp_path/'inf.png'
    r = bench('inference.py', '--arch', 'xresnet18', '--size', 32, '--bs', 2, '--repeats', 1, '--formats', 'nchw', '--png', png)
    assert r.returncode == 0, r.stderr
    names = [row[0] for row in (rows(r.stdout, 'unfused') + rows(r.stdout, 'fused')) if len(row) == 2] # not the ratio rows
    assert names == ['unfused BN', 'unfused BNET', 'fused BN', 'fused BNET']
    assert re.search(r'\| fused BNET / fused BN \| \d+\.\d{3} \| ≥ 0\.90 \|', r.stdout)
    assert png.stat().st_size > 0
    # The ceiling is unfused BNET's batch time over fused BN's plus one BN pass, from the printed numbers.
    ips = {row[0]: float(row[1]) for row in rows(r.stdout, 'unfused') + rows(r.stdout, 'fused') if len(row) == 2}
    bn_pass = float(rows(r.stdout, 'BN')[0][1])
    assert float(rows(r.stdout, 'depthwise')[0][1]) > 0 and bn_pass > 0
    ms = lambda k: 2 / ips[k] * 1e3
    assert float(rows(r.stdout, 'ceiling')[0][1]) == pytest.approx(ms('unfused BNET') / (ms('fused BN') + bn_pass), rel=0.05)

def test_optimizer_step_small():
    r = bench('optimizer_step.py', '--repeats', 1, '--warmup', 1)
    assert r.returncode == 0, r.stderr
    assert [row[0] for row in rows(r.stdout, 'bnet_fastai')] == ['bnet_fastai ranger', 'bnet_fastai ranger_lars']
    assert rows(r.stdout, 'fastai')[0][2] == '1.00×'

@pytest.mark.parametrize('script,args,bad', [('train_step.py', ['--heap', 'bogus'], "'bogus'"),
                                             ('train_step.py', ['--archs', 'xresnet7'], "'xresnet7'"),
                                             ('inference.py', ['--arch', 'nope', '--png', ''], "'nope'")])
def test_bad_arguments_name_the_value_and_choices(script, args, bad, tmp_path):
    r = bench(script, *args)
    assert r.returncode != 0 and bad in r.stderr
    assert 'keep' in r.stderr or 'xresnet50' in r.stderr # the valid choices are listed

@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the message given without CUDA')
def test_gpu_script_fails_fast_without_cuda(tmp_path):
    r = subprocess.run(['bash', str(ROOT/'benchmarks'/'gpu.sh'), str(tmp_path/'gpu.md')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == "benchmarks/gpu.sh: no CUDA device visible to torch; run it on a machine with an NVIDIA GPU"
    assert not (tmp_path/'gpu.md').exists()
