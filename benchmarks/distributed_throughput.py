"""Training samples/s on digits: 1 process versus 2 processes (gloo on CPU, or nccl on GPUs) at the same global batch size.

xresnet18 with BNET everywhere, 32 px, Adam. The 1-process run uses a batch of --global-bs and as many threads as
the 2-process run uses in all (one per process, torchrun's default), and once more with 1 thread; the 2-process runs
use --global-bs/2 per process, without and with --sync-bn. Every configuration is launched from this one script, alternating, --repeats times;
each run reports the median samples/s over its epochs after the first (warm-up). The table shows the medians
over repeats and the ratio to 1 process; a bar plot is saved to --png.
Run: python benchmarks/distributed_throughput.py [--epochs 4] [--repeats 1] [--global-bs 64]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

def worker(a):
    "One run, in each process of a launch: time the training phase of every epoch on rank 0."
    import torch
    from fastai.learner import Learner
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed
    from bnet_fastai.data import digits_dls
    from bnet_fastai.models.xresnet import xresnet18
    from bnet_fastai.distributed import init_distributed, distrib_run, is_rank0, barrier

    class TrainTimer(Callback):
        order = 100
        def before_fit(self): self.rates = []
        def before_train(self): barrier(); self.t0, self.n = time.perf_counter(), 0
        def after_batch(self):
            if self.training: self.n += len(self.yb[0])
        def after_train(self): barrier(); self.rates.append(self.n * self.ws / (time.perf_counter() - self.t0))

    if a.threads: torch.set_num_threads(a.threads)
    init_distributed()
    ws = max(int(os.environ.get('WORLD_SIZE', 1)), 1)
    set_seed(0, reproducible=True)
    learn = Learner(digits_dls(32, a.global_bs // ws), xresnet18(n_out=10, norm='bnet'))
    timer = TrainTimer(); timer.ws = ws
    with distrib_run(learn, sync_bn=a.sync_bn):
        learn.fit(a.epochs, 1e-3, cbs=timer)
    if is_rank0(): Path(a.result).write_text(json.dumps(dict(rates=timer.rates, threads=torch.get_num_threads())))

def run(nproc, sync_bn, a, threads) -> dict:
    "Launch one configuration and return rank 0's result."
    res = Path(tempfile.mkdtemp())/'res.json'
    args = [__file__, '--worker', '--epochs', str(a.epochs), '--global-bs', str(a.global_bs), '--result', str(res),
            '--threads', str(threads)] + (['--sync-bn'] if sync_bn else [])
    if nproc == 1: cmd = [sys.executable, *args]
    else:
        from bnet_fastai.distributed import launch_cmd
        cmd = launch_cmd(nproc, *args)
    subprocess.run(cmd, check=True, env={**os.environ, 'MASTER_ADDR': '127.0.0.1'}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(res.read_text())

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=4); p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--global-bs', type=int, default=64); p.add_argument('--png', default='distributed_throughput.png')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS); p.add_argument('--sync-bn', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--result', help=argparse.SUPPRESS); p.add_argument('--threads', type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker: worker(a); sys.exit()
    from fastprogress.fastprogress import progress_bar
    configs = [('1 process', 1, False, 2), ('1 process, 1 thread', 1, False, 1), ('2 processes', 2, False, 1),
               ('2 processes, --sync-bn', 2, True, 1)]
    rates = {c[0]: [] for c in configs}
    for _ in progress_bar(range(a.repeats * len(configs))):
        name, nproc, sync_bn, threads = configs[_ % len(configs)]
        r = run(nproc, sync_bn, a, threads)
        rates[name].append(statistics.median(r['rates'][1:] or r['rates']))
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med['1 process']
    print(f"digits, xresnet18 (BNET), 32 px, global batch {a.global_bs}, {a.epochs} epochs (first one not timed), "
          f"{a.repeats} repeat(s), {os.cpu_count()} CPU cores")
    print("| run | processes × batch | threads per process | samples/s | vs 1 process |\n|---|---|---|---|---|")
    for name, nproc, _, threads in configs:
        print(f"| {name} | {nproc} × {a.global_bs // nproc} | {threads} | {med[name]:.1f} | {med[name] / base:.2f} |")
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(med), list(med.values())); ax.set_xlabel('training samples/s'); ax.invert_yaxis()
    ax.set_title(f'digits, global batch {a.global_bs}'); fig.tight_layout(); fig.savefig(a.png, dpi=100)
    print(f"plot: {a.png}")
