"""Seconds to reach >= 98% valid accuracy on digits, BN vs BNET (xresnet18, same data, schedule, optimizer and seed).

Both norms are trained in this one process, alternating, `--repeats` times each; the medians are printed.
Run: python benchmarks/digits_time_to_acc.py [--epochs 8] [--repeats 1] [--target 0.98]
"""
import argparse, statistics, time
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from bnet_fastai.config import train_config, SCHEDS
from bnet_fastai.train import get_dls, build_learner

class TimeToAcc(Callback):
    "Record the wall time since the start of `fit` and the valid accuracy at the end of each epoch."
    order = 60
    def before_fit(self): self.t0, self.log = time.perf_counter(), []
    def after_epoch(self): self.log.append((time.perf_counter() - self.t0, self.recorder.values[-1][2]))

def time_to_acc(norm, cfg, target, seed=0):
    set_seed(seed, reproducible=True)
    learn = build_learner(cfg, norm, get_dls(cfg))
    cb = TimeToAcc()
    with learn.no_bar(), learn.no_logging(): getattr(learn, SCHEDS[cfg.sched])(cfg.epochs, cfg.lr, cbs=cb)
    hit = next(((t, e+1, a) for e, (t, a) in enumerate(cb.log) if a >= target), None)
    return hit, cb.log[-1][1]

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=8); p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--target', type=float, default=0.98)
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    res = {n: [] for n in ('bn', 'bnet')}
    for r in range(a.repeats):
        for norm in res:
            cfg = train_config(dataset='digits', arch='xresnet18', norm=norm, epochs=a.epochs)
            res[norm].append(time_to_acc(norm, cfg, a.target))
    print(f"digits, xresnet18, ranger, flat_cos, {a.epochs} epochs, bs 64, 32 px, {torch.get_num_threads()} threads, "
          f"{a.repeats} repeat(s); target valid accuracy {a.target:.0%}")
    print(f"| norm | median s to target | epoch reached | final accuracy |\n|---|---|---|---|")
    med = {}
    for norm, rs in res.items():
        hits = [h for h, _ in rs if h]
        med[norm] = statistics.median(t for t, _, _ in hits) if len(hits) == len(rs) else float('nan')
        eps = ', '.join(str(h[1]) if h else 'never' for h, _ in rs)
        print(f"| {norm} | {med[norm]:.1f} | {eps} | {statistics.median(f for _, f in rs):.4f} |")
    print(f"BNET / BN time-to-target ratio: {med['bnet']/med['bn']:.2f}")
