"""`bnet-train` with a probe: every rank saves its norm statistics after each epoch's training.

    python -m torch.distributed.run --nproc_per_node 2 tests/_norm_stats_probe.py STATS_DIR <bnet-train options>

A normal run writes from rank 0 only; checking that `--sync-bn` keeps the ranks' statistics identical needs each rank's
own copy. The moment matters: validation's first forward makes DDP copy rank 0's buffers to every rank, so after
validation the ranks agree whether or not their statistics were synchronised."""
import sys
from pathlib import Path
import torch
from fastai.callback.core import Callback
from fastai.torch_core import rank_distrib
from bnet_fastai import train
from bnet_fastai.cli import main
from bnet_fastai.distributed import unwrap
from bnet_fastai.placement import bn_base

class NormStatsDump(Callback):
    "After each epoch's training, save this rank's norm running statistics and classes to `folder/<run>_rank<r>.pt`."
    order = 100
    def __init__(self, folder:Path): self.folder = Path(folder)
    def after_train(self):
        norms = {n: o for n, o in unwrap(self.learn.model).named_modules() if isinstance(o, bn_base)}
        stats = {f'{n}.{b}': getattr(o, b).detach().cpu().clone() for n, o in norms.items()
                 for b in ('running_mean', 'running_var', 'num_batches_tracked')}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(dict(stats=stats, types={n: type(o).__name__ for n, o in norms.items()}),
                   self.folder/f'{Path(self.learn.path).name}_rank{rank_distrib()}.pt') # the learner's path is the run's folder

def _with_probe(build_learner, folder):
    def build(*args, **kwargs):
        learn = build_learner(*args, **kwargs)
        learn.add_cb(NormStatsDump(folder))
        return learn
    return build

if __name__ == '__main__':
    train.build_learner = _with_probe(train.build_learner, sys.argv.pop(1))
    main()
