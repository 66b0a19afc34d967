"""Training-step cost of BN vs BNET-3 vs BNET-5 (plain and memory-lean paths), per precision, measured side by side in one process.

Throughput: every variant runs one step per round, in a rotating order, for several rounds; medians are reported,
so load from other processes hits all variants alike. Memory, two methods:
- saved: bytes of the distinct activation storages autograd keeps for backward (`saved_tensors_hooks`, parameters
  excluded). Deterministic: it is the activation memory alive at the end of forward.
- peak: the highest live allocation during one step (forward, backward, optimizer) above what was allocated before it;
  `torch.cuda.max_memory_allocated` on CUDA, the running sum of `torch.profiler`'s allocation events on CPU.
Default: the path a BNET built without `lean` takes (`lean=None`: lean without autocast, plain under it), found by
running one and counting what autocast's forward saves; its row is marked "(default)".
Floor: BN's step plus BNET-3's extra kernels alone (the depthwise conv forward and backward, input and weight grads, at
the shapes and dtype the model's BNETs see), timed in the same rounds. A BNET step cannot beat it; "×floor" is the
floor's time over BNET's (1.0: BNET costs only its kernels).

    python benchmarks/train_step.py            # xresnet18 and xresnet50, 128 px, batch 32, CPU, fp32
    python benchmarks/train_step.py --precision fp32,bf16   # also under bf16 autocast (fp16 needs CUDA)
    python benchmarks/train_step.py --quick    # smoke run: xresnet18, 64 px, batch 8, 2 rounds
    python benchmarks/train_step.py --channels-last
    python benchmarks/train_step.py --device cuda
"""
from __future__ import annotations
import argparse, contextlib, os, platform, statistics, time
import torch, torch.nn.functional as F
from fastprogress.fastprogress import progress_bar
from bnet_fastai.layers import BNET
from bnet_fastai.models.xresnet import arch_registry
from _heap import add_heap_arg, setup_heap

NORMS = {'bn': 'bn', 'bnet3': 'bnet3', 'bnet5': 'bnet5'}
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

def autocast(device, prec):
    "The autocast context of precision `prec` (none for fp32)."
    dt = DTYPES[prec]
    return contextlib.nullcontext() if dt is None else torch.autocast(device.split(':')[0], dtype=dt)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', default='xresnet18,xresnet50', help='comma-separated names from arch_registry')
    p.add_argument('--norms', default='bn,bnet3,bnet5', help=f'comma-separated, from {",".join(NORMS)}')
    p.add_argument('--impls', default='plain,lean', help="BNET training paths to compare: 'plain', 'lean' or both")
    p.add_argument('--size', type=int, default=128, help='image side in pixels')
    p.add_argument('--bs', type=int, default=32, help='batch size')
    p.add_argument('--rounds', type=int, default=4, help='timed steps per variant (median taken)')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--channels-last', action='store_true', help='models and input in channels_last memory format')
    p.add_argument('--precision', default='fp32', help="comma-separated: fp32, bf16, fp16 (autocast; fp16 on CUDA only)")
    add_heap_arg(p)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    p.add_argument('--png', default=None, help="where to save the plot ('' for none; default benchmarks/train_step.png, none with --quick)")
    p.add_argument('--quick', action='store_true', help='smoke run: xresnet18, 64 px, batch 8, 2 rounds')
    p.add_argument('--json', default='', help='also write the raw measurements (ms per round, bytes) to this file')
    a = p.parse_args(argv)
    if a.quick: a.archs, a.size, a.bs, a.rounds = 'xresnet18', 64, 8, 2
    if a.png is None: a.png = '' if a.quick else 'benchmarks/train_step.png' # a smoke run keeps the committed plot
    a.archs, a.norms, a.impls, a.precision = a.archs.split(','), a.norms.split(','), a.impls.split(','), a.precision.split(',')
    for name, vals, valid in [('arch', a.archs, arch_registry), ('norm', a.norms, NORMS), ('impl', a.impls, ('plain', 'lean')),
                              ('precision', a.precision, DTYPES)]:
        bad = [v for v in vals if v not in valid]
        if bad: p.error(f"unknown {name} {bad[0]!r}; valid choices: {', '.join(valid)}")
    if a.device.startswith('cuda') and not torch.cuda.is_available(): p.error("--device cuda given but CUDA is not available")
    if a.device not in ('cpu',) and not a.device.startswith('cuda'): p.error(f"unknown device {a.device!r}; valid choices: cpu, cuda")
    if 'fp16' in a.precision and not a.device.startswith('cuda'): p.error("--precision fp16 needs --device cuda; on a CPU use fp32 or bf16")
    return a

def build(arch, norm, impl, device, mf=torch.contiguous_format):
    torch.manual_seed(0)
    m = arch_registry[arch](n_out=10, norm=NORMS[norm]).to(device, memory_format=mf).train()
    for l in m.modules():
        if isinstance(l, BNET): l.lean = impl == 'lean'
    return m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

def variants(a):
    "(precision, arch, norm, impl) for every row; BN has no BNET path to choose; 'floor' rows time `DWKernels` (with BN's step)."
    return [(p, arch, n, impl) for p in a.precision for arch in a.archs
            for n in a.norms + (['floor'] if 'bn' in a.norms and 'bnet3' in a.norms else [])
            for impl in (['-'] if n in ('bn', 'floor') else a.impls)]

def default_path(device, prec) -> str:
    "The path BNET's default (`lean=None`) takes at precision `prec`: the one whose saved tensors it matches."
    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    def saved(lean):
        m, n = BNET(4, lean=lean).to(device), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(tuple(t.shape)) or t, lambda t: t), autocast(device, prec): m(x)
        return n
    found = [impl for impl, lean in (('lean', True), ('plain', False)) if saved(lean) == saved(None)]
    assert len(found) == 1, found
    return found[0]

def sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()

def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    with autocast(str(x.device), opt.prec): loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

def bnet_shapes(model, x, ks=3):
    "(input shape, kernel size) of every BNET-`ks`, from one forward."
    shapes, hooks = [], [l.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
                         for l in model.modules() if isinstance(l, BNET) and l.ks == ks]
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    return [(s, ks) for s in shapes]

class DWKernels:
    "BNET's extra kernels alone: depthwise conv forward and backward (input and weight grads) at `shapes`, in the conv's dtype."
    def __init__(self, shapes, device, prec, mf):
        dt = DTYPES[prec] or torch.float32
        self.ts = [(torch.randn(s, device=device, dtype=dt).to(memory_format=mf if len(s) == 4 else torch.contiguous_format),
                    torch.randn(s[1], 1, k, k, device=device, dtype=dt), torch.zeros(s[1], device=device, dtype=dt), k)
                   for s, k in shapes]
    def __call__(self):
        for x, w, b, k in self.ts:
            y = F.conv2d(x, w, b, padding=k//2, groups=x.shape[1])
            torch.ops.aten.convolution_backward(torch.ones_like(y), x, w, [x.shape[1]], [1, 1], [k//2]*2, [1, 1], False,
                                                [0, 0], x.shape[1], [True, True, True])

def saved_bytes(model, opt, x, y):
    "Bytes of distinct non-parameter storages saved for backward by one forward."
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device == x.device: seen[s.data_ptr()] = s.nbytes()
        return t
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(str(x.device), opt.prec):
        loss = F.cross_entropy(model(x), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True) # a full step: creates the momentum buffers
    return sum(seen.values())

@contextlib.contextmanager
def _quiet_stderr():
    "The profiler's C++ side logs its start/stop to fd 2; keep that out of the printed table."
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try: os.dup2(null, 2); yield
    finally: os.dup2(saved, 2); os.close(saved); os.close(null)

def peak_bytes(model, opt, x, y, device):
    "Highest live allocation during one step, above the allocation before it."
    if device.startswith('cuda'):
        sync(device); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        step(model, opt, x, y); sync(device)
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, opt, x, y)
    from torch._C._profiler import _EventType
    def walk(nodes):
        for n in nodes: yield n; yield from walk(n.children)
    allocs = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if e.typed[0] == _EventType.Allocation), key=lambda e: e.start_time_ns)
    live = peak = 0
    for e in allocs: live += e.typed[1].alloc_size; peak = max(peak, live)
    return peak

def run(a):
    if a.threads: torch.set_num_threads(a.threads)
    rows = variants(a)
    torch.manual_seed(0)
    mf = torch.channels_last if a.channels_last else torch.contiguous_format
    x = torch.randn(a.bs, 3, a.size, a.size, device=a.device).to(memory_format=mf); y = torch.randint(0, 10, (a.bs,), device=a.device)
    models, fns = {}, {}
    for r in rows:
        if r[2] == 'floor': continue
        models[r] = m, o = build(*r[1:], a.device, mf)
        o.prec = r[0]
        fns[r] = lambda m=m, o=o: step(m, o, x, y)
    for r in rows:
        if r[2] != 'floor': continue
        with autocast(a.device, r[0]): shapes = bnet_shapes(models[(r[0], r[1], 'bnet3', a.impls[0])][0], x)
        fns[r] = DWKernels(shapes, a.device, r[0], mf)
    res = {r: dict(times=[]) for r in rows}
    pb = progress_bar(rows); pb.comment = 'warm-up and memory'
    for r in pb:
        if r[2] == 'floor': fns[r](); continue
        m, o = models[r]
        res[r]['saved'] = saved_bytes(m, o, x, y) # also the warm-up step (allocator, oneDNN primitives)
        res[r]['peak'] = peak_bytes(m, o, x, y, a.device)
    pb = progress_bar(range(a.rounds)); pb.comment = 'timed rounds'
    for i in pb:
        order = rows[i % len(rows):] + rows[:i % len(rows)] # rotate so no variant always runs first
        for r in order:
            sync(a.device); t0 = time.perf_counter(); fns[r](); sync(a.device)
            res[r]['times'].append(time.perf_counter() - t0)
    for r in rows: res[r]['ms'] = 1e3 * statistics.median(res[r]['times'])
    for r in rows: # the floor row: BN's step plus the kernels, each median from the same rounds
        if r[2] == 'floor': res[r]['ms'] += res[(r[0], r[1], 'bn', '-')]['ms']
    for r in rows: res[r]['ips'] = a.bs / (res[r]['ms'] / 1e3)
    a.defaults = {p: default_path(a.device, p) for p in a.precision}
    a.floor_kernels = {r: len(fns[r].ts) for r in rows if r[2] == 'floor'}
    return rows, res

def machine(a):
    if a.device.startswith('cuda'): return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"

def table(a, rows, res):
    mib = lambda b: b / 2**20
    fmt = 'channels_last' if a.channels_last else 'NCHW'
    out = [f"xresnet train step (forward, backward, SGD), {a.size} px, batch {a.bs}, {fmt}, {a.device} ({machine(a)}, {a.heap_words}), "
           f"torch {torch.__version__}; medians of {a.rounds} alternating rounds"]
    for p in a.precision:
        out += ['', f"precision {p}" + ('' if p == 'fp32' else ' (autocast)'),
                '', '| arch | norm | BNET path | step ms | images/s | speed ×BN | ×floor | saved act. MiB | ×BN | peak MiB | ×BN |',
                '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for r in (r for r in rows if r[0] == p):
            b, f, v = res.get((p, r[1], 'bn', '-')), res.get((p, r[1], 'floor', '-')), res[r]
            ratio = lambda k: '–' if b is None or k not in v else f"{v[k]/b[k]:.3f}"
            mem = lambda k: '–' if k not in v else f"{mib(v[k]):.0f}"
            fl = f"{f['ms']/v['ms']:.3f}" if f is not None and r[2] == 'bnet3' else '–'
            path = r[3] + (' (default)' if r[2] != 'bn' and r[3] == a.defaults[p] else '')
            out.append(f"| {r[1]} | {r[2]} | {path} | {v['ms']:.0f} | {v['ips']:.1f} | {ratio('ips')} | {fl} | "
                       f"{mem('saved')} | {ratio('saved')} | {mem('peak')} | {ratio('peak')} |")
    return '\n'.join(out)

def targets(a, res):
    "P1 (BNET-3 speed ≥ 0.85× BN, and ≥ 0.95 of the floor) and P2 (BNET-3 peak memory ≤ 1.05× BN), per precision and path."
    out = []
    for p, arch in dict.fromkeys(r[:2] for r in res): # the default path: BN's memory (fp32) at the plain path's speed
        b, d, pl = (res.get((p, arch, n, i)) for n, i in (('bn', '-'), ('bnet3', a.defaults[p]), ('bnet3', 'plain')))
        if b is None or d is None or pl is None: continue
        s, pk = d['ips']/pl['ips'], d['peak']/b['peak']
        out.append(f"{p} {arch} BNET-3 default ({a.defaults[p]}): speed {s:.3f}× the plain path's "
                   f"({'met' if s >= 0.97 else 'missed'}, target ≥0.97); peak memory {pk:.3f}×BN"
                   + (f" ({'met' if pk <= 1.05 else 'missed'}, target ≤1.05)" if p == 'fp32' else ''))
    for p, arch in dict.fromkeys(r[:2] for r in res):
        b, f = res.get((p, arch, 'bn', '-')), res.get((p, arch, 'floor', '-'))
        for impl in ('plain', 'lean'):
            v = res.get((p, arch, 'bnet3', impl))
            if b is None or v is None: continue
            s, pk = v['ips']/b['ips'], v['peak']/b['peak']
            fl = f" and {f['ms']/v['ms']:.3f} of the floor ({'met' if f['ms']/v['ms'] >= 0.95 else 'missed'}, target ≥0.95)" if f else ''
            out.append(f"{p} {arch} BNET-3 {impl}: P1 speed {s:.3f}×BN ({'met' if s >= 0.85 else 'missed'}, target ≥0.85){fl}; "
                       f"P2 peak memory {pk:.3f}×BN ({'met' if pk <= 1.05 else 'missed'}, target ≤1.05)")
    return '\n'.join(out)

def plot(a, rows, res, path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in rows if r[2] != 'floor']
    labels = [f"{r[1]} {r[0]}\n{r[2]}" + ('' if r[3] == '-' else f" {r[3]}") for r in rows]
    axs[0].bar(labels, [res[r]['ips'] for r in rows]); axs[0].set_ylabel('images/s (median)')
    axs[1].bar(labels, [res[r]['peak']/2**20 for r in rows]); axs[1].set_ylabel('peak step memory, MiB')
    for ax in axs: ax.tick_params(axis='x', labelrotation=90, labelsize=7)
    fig.suptitle(f"train step, {a.size} px, batch {a.bs}, {a.device}"); fig.tight_layout(); fig.savefig(path, dpi=120)

def main(argv=None):
    a = parse_args(argv)
    a.heap_words = setup_heap(a.heap)
    t0 = time.perf_counter()
    rows, res = run(a)
    print(table(a, rows, res)); print(); print(targets(a, res))
    if a.json:
        import json
        with open(a.json, 'w') as f:
            json.dump(dict(defaults=a.defaults, bs=a.bs, floor_kernels=[[*r, n] for r, n in a.floor_kernels.items()],
                           rows=[dict(zip(('precision', 'arch', 'norm', 'impl'), r), **res[r]) for r in rows]), f)
    if a.png: plot(a, rows, res, a.png); print(f"plot saved to {a.png}")
    print(f"total {time.perf_counter()-t0:.0f} s")

if __name__ == '__main__': main()
