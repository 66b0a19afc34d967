"""Inference throughput (CPU by default; `--device cuda --precision bf16` for a GPU under autocast) of BN and BNET XResNets, unfused and fused by `fuse_bnet`, at 128 px and batch 32.

All variants run in one process; repeats alternate between them so that machine load affects each alike, and the
table reports medians. Folding removes only BNET's normalisation pass, so it also times, alone and warm, one BN pass and
one depthwise pass over every BNET's activations. Any separate depthwise pass must read and write what a BN pass does, so
"fused BN + one BN pass" bounds how fast fused BNET can get: the ceiling row. Usage: `python benchmarks/inference.py [--arch xresnet50 xresnet18] [--repeats 7] [--formats nchw channels_last] [--bnet-at all] [--heap keep]`."""
import argparse, contextlib, platform, time, statistics
from collections import Counter
import torch
from torch import nn
from fastprogress.fastprogress import progress_bar
from bnet_fastai.models.xresnet import arch_registry
from bnet_fastai.deploy import fuse_bnet
from bnet_fastai.layers import BNET
from _heap import add_heap_arg, setup_heap

RUN = dict(device='cpu', dtype=None) # set by `main`: where the models run, and the autocast dtype (None: fp32)
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

def _sync():
    if RUN['device'].startswith('cuda'): torch.cuda.synchronize()

def _cast():
    return contextlib.nullcontext() if RUN['dtype'] is None else torch.autocast(RUN['device'].split(':')[0], dtype=RUN['dtype'])

def trained_like(model):
    "Running statistics away from their defaults, as training would leave them (fusion must not be a no-op)."
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()

def variants(arch, channels_last, bnet_at='all'):
    "name → eval model: unfused BN, fused BN, unfused BNET, fused BNET."
    mf = torch.channels_last if channels_last else torch.contiguous_format
    bn, bnet = trained_like(arch_registry[arch](norm='bn')), trained_like(arch_registry[arch](norm='bnet', bnet_at=bnet_at))
    res = {'unfused BN': bn, 'fused BN': fuse_bnet(bn), 'unfused BNET': bnet, 'fused BNET': fuse_bnet(bnet)}
    return {k: v.to(RUN['device'], memory_format=mf) for k, v in res.items()}

def _time(f, x):
    "Seconds one call `f(x)` takes."
    _sync(); t = time.perf_counter()
    with _cast(): f(x)
    _sync(); return time.perf_counter() - t

def bnet_shapes(model, x):
    "Input shape of every BNET in `model` (with how many BNETs share it) when `model(x)` runs."
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), m.ks)))
             for m in model.modules() if isinstance(m, BNET)]
    with torch.inference_mode(): model(x)
    for h in hooks: h.remove()
    return Counter(seen)

def pass_costs(shapes, channels_last, repeats=5):
    "ms per batch of an eval BatchNorm pass and of the depthwise conv over every BNET's activations, each timed warm."
    mf = torch.channels_last if channels_last else torch.contiguous_format
    med = lambda f, x: statistics.median(_time(f, x) for _ in range(repeats))
    res = {'BN pass': 0., 'depthwise pass': 0.}
    with torch.inference_mode():
        for (shape, ks), n in shapes.items():
            x, c = torch.randn(shape, device=RUN['device']).to(memory_format=mf), shape[1]
            bn = nn.BatchNorm2d(c, affine=False).to(RUN['device']).eval()
            dw = nn.Conv2d(c, c, ks, padding=ks//2, groups=c).to(RUN['device'], memory_format=mf).eval()
            for f in (bn, dw): _time(f, x) # warm-up: caches, oneDNN's kernel choice
            res['BN pass'] += n * med(bn, x) * 1e3; res['depthwise pass'] += n * med(dw, x) * 1e3
    return res

def bench(models, x, repeats, warmup=2):
    "Median images/s of each model, timing one batch per model per repeat, alternating models."
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup): _time(m, x)
        for _ in progress_bar(range(repeats)):
            for k, m in models.items():
                times[k].append(_time(m, x))
    return {k: len(x) / statistics.median(v) for k, v in times.items()}

def fold_ceiling(ips, costs, bs):
    "The most fused BNET / unfused BNET could be if its depthwise pass cost no more than one BN pass: fused BN + that pass."
    ms = lambda k: bs / ips[k] * 1e3
    return ms('unfused BNET') / (ms('fused BN') + costs['BN pass'])

def table(label, ips, costs, bs):
    r = lambda a, b: ips[a] / ips[b]
    rows = [f"| variant | images/s ({label}) |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in ips.items()]
    rows += ["", "| ratio | value | target |", "|---|---|---|",
             f"| fused BNET / fused BN | {r('fused BNET', 'fused BN'):.3f} | ≥ 0.90 |",
             f"| fused BNET / unfused BNET | {r('fused BNET', 'unfused BNET'):.3f} | ≥ 1.20 |",
             f"| fused BN / unfused BN | {r('fused BN', 'unfused BN'):.3f} | |",
             f"| unfused BNET / unfused BN | {r('unfused BNET', 'unfused BN'):.3f} | |",
             f"| ceiling of fused BNET / unfused BNET | {fold_ceiling(ips, costs, bs):.3f} | |"]
    rows += ["", "| pass over every BNET's activations, timed alone | ms per batch |", "|---|---|"]
    rows += [f"| {k} | {v:.2f} |" for k, v in costs.items()]
    return '\n'.join(rows)

def plot(results, fname):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(next(iter(results.values())))
    w = 0.8 / len(results)
    for i, (label, ips) in enumerate(results.items()):
        ax.bar([j + i * w for j in range(len(names))], [ips[n] for n in names], w, label=label)
    ax.set_xticks([j + w * (len(results) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel('images/s (CPU, batch 32, 128 px)'); ax.legend(); fig.tight_layout(); fig.savefig(fname, dpi=120)

def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--arch', nargs='+', default=['xresnet50'], help='names from arch_registry')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--formats', nargs='+', default=['nchw', 'channels_last'], choices=['nchw', 'channels_last'])
    p.add_argument('--bnet-at', default='all', choices=['all', 'last'], help="BNET placement: every norm, or residual-last only")
    p.add_argument('--png', default='benchmarks/inference.png')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--precision', default='fp32', choices=list(DTYPES), help='autocast dtype (fp16 on CUDA only)')
    add_heap_arg(p)
    a = p.parse_args()
    if a.device.startswith('cuda') and not torch.cuda.is_available(): p.error("--device cuda given but CUDA is not available")
    if a.precision == 'fp16' and not a.device.startswith('cuda'): p.error("--precision fp16 needs --device cuda")
    RUN.update(device=a.device, dtype=DTYPES[a.precision])
    for arch in a.arch:
        if arch not in arch_registry: p.error(f"unknown arch {arch!r}; valid names: {', '.join(arch_registry)}")
    heap = setup_heap(a.heap)
    torch.manual_seed(0); torch.set_num_threads(a.threads)
    where = torch.cuda.get_device_name() if a.device.startswith('cuda') else f"CPU, {platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"inference, {a.precision}, batch {a.bs}, {a.size} px, {where}, "
          f"torch {torch.__version__}, {heap}; medians of {a.repeats} alternating repeats")
    results = {}
    for arch in a.arch:
        for fmt in a.formats:
            cl = fmt == 'channels_last'
            x = torch.randn(a.bs, 3, a.size, a.size, device=a.device).to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            models = variants(arch, cl, a.bnet_at)
            ips = bench(models, x, a.repeats)
            costs = pass_costs(bnet_shapes(models['unfused BNET'], x), cl)
            label = f"{arch}, {fmt}, BNET at {a.bnet_at}"
            results[label] = ips
            print(f"\n{table(label, ips, costs, a.bs)}\n", flush=True)
    if a.png: plot(results, a.png); print(f"plot: {a.png}")

if __name__ == '__main__': main()
