"""The GPU versions of the CPU stand-ins in tests/test_gpu_emulation.py, to run on a CUDA machine; without one it says so and exits 0.

    python benchmarks/gpu_check.py [--out gpu_check_runs]

Checks, each printed as a line `ok`/`FAIL name: detail`:
- lean vs plain BNET path, fp32 / bf16 / fp16 autocast and an all-fp16 model, NCHW and channels_last: outputs and gradients agree;
- every opt_func (and Lookahead around one) for 10 steps after the model moved to the GPU;
- `bnet-train` on digits with bf16 (fp16 where the GPU has no native bf16) and --channels-last for 2 epochs, then a run resumed from epoch 1's checkpoint;
- `export_onnx(check=True)` of a fused xresnet18-bnet with TF32 on (the default) and off.
"""
import argparse, copy, shutil, subprocess, sys, tempfile, traceback
from pathlib import Path
import torch
from torch import nn
import fastai.optimizer as fo
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from bnet_fastai.models.xresnet import xresnet18
from bnet_fastai.layers import BNET
from bnet_fastai.optimizers import opt_registry, lookahead
from bnet_fastai.deploy import fuse_bnet, export_onnx

def report(name, fn):
    try: detail = fn(); print(f"ok   {name}" + (f": {detail}" if detail else ''), flush=True); return True
    except Exception as e:
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True); traceback.print_exc(limit=3); return False

def lean_vs_plain(dtype, channels_last, whole_model):
    torch.manual_seed(0)
    ref = xresnet18(n_out=10, norm='bnet').cuda().train()
    if whole_model: ref = ref.to(dtype)
    x = torch.randn(8, 3, 64, 64, device='cuda', dtype=dtype if whole_model else torch.float32)
    if channels_last: ref, x = ref.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    outs = []
    for lean in (False, True):
        m = copy.deepcopy(ref)
        for b in m.modules():
            if isinstance(b, BNET): b.lean = lean
        ac = not whole_model and dtype != torch.float32
        with torch.autocast('cuda', dtype=dtype, enabled=ac):
            y = m(x)
        y.float().sum().backward()
        outs.append((y.float(), [p.grad.float() for p in m.parameters()]))
    (y0, g0), (y1, g1) = outs
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    dy = (y0 - y1).abs().max().item()
    dg = max(((a - b).abs().max() / (a.abs().max() + 1e-12)).item() for a, b in zip(g0, g1))
    assert dy <= tol and dg <= tol * 10, f"max |Δout| {dy:.2e}, max relative |Δgrad| {dg:.2e}"
    return f"max |Δout| {dy:.2e}, max relative |Δgrad| {dg:.2e}"

def opt_steps(name, opt_func):
    g = torch.Generator().manual_seed(0)
    ds = list(zip(torch.randn(80, 3, 32, 32, generator=g), torch.randint(0, 10, (80,), generator=g)))
    dls = DataLoaders(DataLoader(ds, bs=8), DataLoader(ds[:8], bs=8), device='cuda')
    learn = Learner(dls, xresnet18(n_out=10, norm='bnet'), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func) # adahessian's Learner adds HessianBackward itself
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3) # create_opt on the CPU model, then fastai moves it
    assert learn.train_iter == 10 and all(p.is_cuda and torch.isfinite(p).all() for p in learn.model.parameters())

def train_and_resume(out, precision):
    args = [sys.executable, '-m', 'bnet_fastai.cli', '--dataset', 'digits', '--arch', 'xresnet18', '--norm', 'bnet',
            '--epochs', '2', '--size', '32', '--bs', '64', '--precision', precision, '--channels-last', '--opt', 'ranger_lars']
    full = subprocess.run(args + ['--out', str(out/'full')], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    # resume: keep epoch 1's checkpoint only, by training 1 epoch and copying it into a 2-epoch folder
    one = subprocess.run([a if a != '2' else '1' for a in args] + ['--out', str(out/'one'), '--keep-checkpoints'], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    shutil.copytree(out/'one'/'bnet_s0', out/'res'/'bnet_s0')
    assert (out/'res'/'bnet_s0'/'checkpoint.pth').exists()
    (out/'res'/'bnet_s0'/'metrics.json').unlink()
    shutil.copy(out/'full'/'config.json', out/'res'/'config.json')
    res = subprocess.run(args + ['--out', str(out/'res'), '--resume'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'epoch 1/2' not in res.stdout and 'epoch 2/2' in res.stdout, res.stdout # only epoch 2 trained: it resumed
    row = lambda p: next(l for l in p.stdout.splitlines() if l.startswith('| bnet |')) # the summary table's row
    return f"full {row(full)} resumed {row(res)}"

def onnx_check(tf32):
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        m = xresnet18(n_out=10, norm='bnet').cuda().eval()
        fused = fuse_bnet(m)
        export_onnx(fused, torch.randn(4, 3, 64, 64, device='cuda'))
    finally: torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

def main(out=None):
    if not torch.cuda.is_available():
        print("no CUDA device: skipped"); return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for cl in (False, True):
            for whole in ((False, True) if dt != torch.float32 else (False,)):
                ok.append(report(f"lean vs plain {str(dt)[6:]} {'channels_last' if cl else 'NCHW'}{' all-half model' if whole else ' autocast' if dt != torch.float32 else ''}",
                                 lambda: lean_vs_plain(dt, cl, whole)))
    for name, f in {**opt_registry, "lookahead('ranger')": lookahead('ranger'), 'fastai.Adam': fo.Adam}.items():
        ok.append(report(f"opt_func {name}: 10 steps after the move", lambda: opt_steps(name, f)))
    with tempfile.TemporaryDirectory() as d:
        prec = 'bf16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'fp16' # bnet-train refuses emulated bf16
        ok.append(report(f"bnet-train digits --precision {prec} --channels-last, and --resume", lambda: train_and_resume(Path(out or d), prec)))
    for tf32 in (True, False): ok.append(report(f"export_onnx check, TF32 {'on' if tf32 else 'off'}", lambda: onnx_check(tf32)))
    print(f"{sum(ok)}/{len(ok)} checks passed")
    return 0 if all(ok) else 1

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=None, help="keep bnet-train's runs here (default: a temporary folder)")
    sys.exit(main(ap.parse_args().out))
