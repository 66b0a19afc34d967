"""`bnet-train` with a probe: Ctrl-C (SIGINT to itself) at a fixed batch of a fixed epoch, for a deterministic interrupt.

    python tests/_interrupt_probe.py EPOCH BATCH <bnet-train options>

EPOCH and BATCH count from 1. The signal is sent from inside the run, so where it lands does not depend on timing.
With `PROBE_KILL_LAUNCH=1`, rank 0 instead SIGKILLs the whole launch it runs in (the launcher, every rank, itself):
a machine dying mid-epoch."""
import os, signal, sys
import psutil
from fastai.callback.core import Callback
from bnet_fastai import train
from bnet_fastai.cli import main

class CtrlC(Callback):
    "Send this process SIGINT after training batch `batch` of epoch `epoch` (both from 1)."
    def __init__(self, epoch:int, batch:int): self.epoch_at, self.batch_at = epoch - 1, batch - 1
    def after_batch(self):
        if not (self.training and self.epoch == self.epoch_at and self.iter == self.batch_at): return
        if os.environ.get('PROBE_KILL_LAUNCH') != '1': return os.kill(os.getpid(), signal.SIGINT)
        if os.environ.get('RANK', '0') != '0': return
        launcher = psutil.Process(os.getppid())
        me = psutil.Process()
        for q in [p for p in launcher.children(recursive=True) if p.pid != me.pid] + [launcher]: q.send_signal(signal.SIGKILL)
        me.send_signal(signal.SIGKILL)

def _with_probe(build_learner, epoch, batch):
    def build(*args, **kwargs):
        learn = build_learner(*args, **kwargs)
        learn.add_cb(CtrlC(epoch, batch))
        return learn
    return build

if __name__ == '__main__':
    # a process started with SIGINT ignored (as pytest-xdist's workers are) would keep ignoring it: give it Python's handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    epoch, batch = int(sys.argv.pop(1)), int(sys.argv.pop(1))
    train.build_learner = _with_probe(train.build_learner, epoch, batch)
    main()
