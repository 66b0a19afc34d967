"""Median optimizer step time on xresnet50's parameters (CPU, or `--device cuda`), ours against fastai's `ranger` and torch's AdamW.

    python benchmarks/optimizer_step.py [--repeats 15] [--threads 2] [--png optimizer_step.png]

Every optimizer steps its own copy of the parameters with the same fixed gradients. The optimizers take turns
one step at a time, so any drift in machine load hits them all alike; medians over the repeats are reported.
"""
import argparse, statistics, time
import torch
from fastprogress.fastprogress import progress_bar
import fastai.optimizer as fo
from bnet_fastai.models.xresnet import xresnet50
from bnet_fastai.optimizers import ranger, ranger_lars
from _heap import add_heap_arg, setup_heap

def param_copy(model, device='cpu'):
    ps = [p.detach().to(device).clone().requires_grad_(True) for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    for p in ps: p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    return ps

CANDIDATES = {
    'bnet_fastai ranger':      lambda ps: ranger(ps, lr=1e-3),
    'bnet_fastai ranger_lars': lambda ps: ranger_lars(ps, lr=1e-3),
    'fastai ranger':           lambda ps: fo.ranger(ps, lr=1e-3),
    'torch AdamW (foreach)':   lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
}

def main(repeats=15, warmup=7, threads=2, png=None, heap='keep', device='cpu'):
    heap = setup_heap(heap)
    torch.set_num_threads(threads)
    model = xresnet50()
    opts = {name: make(param_copy(model, device)) for name, make in CANDIDATES.items()}
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    # Warm-up also takes every RAdam-style optimizer past its un-rectified first steps.
    for _ in range(warmup):
        for o in opts.values(): o.step()
    times = {name: [] for name in opts}
    for _ in progress_bar(range(repeats)):
        for name, o in opts.items():
            sync(); t0 = time.perf_counter(); o.step(); sync(); times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med['fastai ranger']
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if device.startswith('cuda') else f'{threads} threads'
    print(f'xresnet50: {n_params:,} parameters, {len(list(model.parameters()))} tensors; torch {torch.__version__}, '
          f'{where}, {heap}, {repeats} alternating repeats after {warmup} warm-up steps\n')
    print('| optimizer | median step (ms) | ratio to fastai ranger |')
    print('|---|---:|---:|')
    for name, m in med.items(): print(f'| {name} | {m*1e3:.1f} | {m/base:.2f}× |')
    if png:
        import matplotlib; matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh(list(med), [m*1e3 for m in med.values()])
        ax.set_xlabel('median step time (ms), xresnet50 on CPU'); ax.invert_yaxis()
        fig.tight_layout(); fig.savefig(png, dpi=120)
        print(f'\nplot saved to {png}')
    return med

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--warmup', type=int, default=7)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--png', default=None, help='also save a bar chart here')
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    add_heap_arg(ap)
    a = ap.parse_args()
    if a.device.startswith('cuda') and not torch.cuda.is_available(): ap.error("--device cuda given but CUDA is not available")
    main(a.repeats, a.warmup, a.threads, a.png, a.heap, a.device)
