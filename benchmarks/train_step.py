"""Training-step cost of BN vs BNET-3 vs BNET-5 (plain and memory-lean paths), measured side by side in one process.

Throughput: every variant runs one step per round, in a rotating order, for several rounds; medians are reported,
so load from other processes hits all variants alike. Memory, two methods:
- saved: bytes of the distinct activation storages autograd keeps for backward (`saved_tensors_hooks`, parameters
  excluded). Deterministic: it is the activation memory alive at the end of forward.
- peak: the highest live allocation during one step (forward, backward, optimizer) above what was allocated before it;
  `torch.cuda.max_memory_allocated` on CUDA, the running sum of `torch.profiler`'s allocation events on CPU.

    python benchmarks/train_step.py            # xresnet18 and xresnet50, 128 px, batch 32, CPU
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
    add_heap_arg(p)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    p.add_argument('--png', default=None, help="where to save the plot ('' for none; default benchmarks/train_step.png, none with --quick)")
    p.add_argument('--quick', action='store_true', help='smoke run: xresnet18, 64 px, batch 8, 2 rounds')
    a = p.parse_args(argv)
    if a.quick: a.archs, a.size, a.bs, a.rounds = 'xresnet18', 64, 8, 2
    if a.png is None: a.png = '' if a.quick else 'benchmarks/train_step.png' # a smoke run keeps the committed plot
    a.archs, a.norms, a.impls = a.archs.split(','), a.norms.split(','), a.impls.split(',')
    for name, vals, valid in [('arch', a.archs, arch_registry), ('norm', a.norms, NORMS), ('impl', a.impls, ('plain', 'lean'))]:
        bad = [v for v in vals if v not in valid]
        if bad: p.error(f"unknown {name} {bad[0]!r}; valid choices: {', '.join(valid)}")
    if a.device.startswith('cuda') and not torch.cuda.is_available(): p.error("--device cuda given but CUDA is not available")
    if a.device not in ('cpu',) and not a.device.startswith('cuda'): p.error(f"unknown device {a.device!r}; valid choices: cpu, cuda")
    return a

def variants(a):
    "(arch, norm, impl) for every row; BN has no BNET path to choose."
    return [(arch, n, impl) for arch in a.archs for n in a.norms for impl in (['-'] if n == 'bn' else a.impls)]

def build(arch, norm, impl, device, mf=torch.contiguous_format):
    torch.manual_seed(0)
    m = arch_registry[arch](n_out=10, norm=NORMS[norm]).to(device, memory_format=mf).train()
    for l in m.modules():
        if isinstance(l, BNET): l.lean = impl == 'lean'
    return m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

def sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()

def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()

def saved_bytes(model, opt, x, y):
    "Bytes of distinct non-parameter storages saved for backward by one forward."
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device == x.device: seen[s.data_ptr()] = s.nbytes()
        return t
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): loss = F.cross_entropy(model(x), y)
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
    models = {r: build(*r, a.device, mf) for r in rows}
    res = {r: dict(times=[]) for r in rows}
    pb = progress_bar(rows); pb.comment = 'warm-up and memory'
    for r in pb:
        m, o = models[r]
        res[r]['saved'] = saved_bytes(m, o, x, y) # also the warm-up step (allocator, oneDNN primitives)
        res[r]['peak'] = peak_bytes(m, o, x, y, a.device)
    pb = progress_bar(range(a.rounds)); pb.comment = 'timed rounds'
    for i in pb:
        order = rows[i % len(rows):] + rows[:i % len(rows)] # rotate so no variant always runs first
        for r in order:
            m, o = models[r]
            sync(a.device); t0 = time.perf_counter(); step(m, o, x, y); sync(a.device)
            res[r]['times'].append(time.perf_counter() - t0)
    for r in rows:
        res[r]['ms'] = 1e3 * statistics.median(res[r]['times'])
        res[r]['ips'] = a.bs / (res[r]['ms'] / 1e3)
    return rows, res

def machine(a):
    if a.device.startswith('cuda'): return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"

def table(a, rows, res):
    mib = lambda b: b / 2**20
    fmt = 'channels_last' if a.channels_last else 'NCHW'
    out = [f"xresnet train step (forward, backward, SGD), {a.size} px, batch {a.bs}, {fmt}, {a.device} ({machine(a)}, {a.heap_words}), "
           f"torch {torch.__version__}; medians of {a.rounds} alternating rounds",
           '', '| arch | norm | BNET path | step ms | images/s | speed ×BN | saved act. MiB | ×BN | peak MiB | ×BN |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        b = res[(r[0], 'bn', '-')] if (r[0], 'bn', '-') in res else None
        v = res[r]
        ratio = lambda k, inv=False: '–' if b is None else f"{(b[k]/v[k] if inv else v[k]/b[k]):.3f}"
        out.append(f"| {r[0]} | {r[1]} | {r[2]} | {v['ms']:.0f} | {v['ips']:.1f} | {ratio('ips')} | "
                   f"{mib(v['saved']):.0f} | {ratio('saved')} | {mib(v['peak']):.0f} | {ratio('peak')} |")
    return '\n'.join(out)

def targets(res):
    "P1 (BNET-3 speed ≥ 0.95× BN on xresnet50) and P2 (BNET-3 peak memory ≤ 1.15× BN), per BNET path measured."
    out = []
    for arch in dict.fromkeys(r[0] for r in res):
        b = res.get((arch, 'bn', '-'))
        for impl in ('plain', 'lean'):
            v = res.get((arch, 'bnet3', impl))
            if b is None or v is None: continue
            s, pk, sv = v['ips']/b['ips'], v['peak']/b['peak'], v['saved']/b['saved']
            out.append(f"{arch} BNET-3 {impl}: P1 speed {s:.3f}×BN ({'met' if s >= 0.95 else 'missed'}, target ≥0.95); "
                       f"P2 peak memory {pk:.3f}×BN, saved activations {sv:.3f}×BN ({'met' if max(pk, sv) <= 1.15 else 'missed'}, target ≤1.15)")
    return '\n'.join(out)

def plot(a, rows, res, path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r[0]}\n{r[1]}" + ('' if r[2] == '-' else f" {r[2]}") for r in rows]
    axs[0].bar(labels, [res[r]['ips'] for r in rows]); axs[0].set_ylabel('images/s (median)')
    axs[1].bar(labels, [res[r]['peak']/2**20 for r in rows]); axs[1].set_ylabel('peak step memory, MiB')
    for ax in axs: ax.tick_params(axis='x', labelrotation=90, labelsize=7)
    fig.suptitle(f"train step, {a.size} px, batch {a.bs}, {a.device}"); fig.tight_layout(); fig.savefig(path, dpi=120)

def main(argv=None):
    a = parse_args(argv)
    a.heap_words = setup_heap(a.heap)
    t0 = time.perf_counter()
    rows, res = run(a)
    print(table(a, rows, res)); print(); print(targets(res))
    if a.png: plot(a, rows, res, a.png); print(f"plot saved to {a.png}")
    print(f"total {time.perf_counter()-t0:.0f} s")

if __name__ == '__main__': main()
