"""`bnet-train` with a probe: Ctrl-C (SIGINT to itself) at a fixed batch of a fixed epoch, for a deterministic interrupt.

    python tests/_interrupt_probe.py EPOCH BATCH <bnet-train options>

EPOCH and BATCH count from 1. The signal is sent from inside the run, so where it lands does not depend on timing."""
import os, signal, sys
from fastai.callback.core import Callback
from bnet_fastai import train
from bnet_fastai.cli import main

class CtrlC(Callback):
    "Send this process SIGINT after training batch `batch` of epoch `epoch` (both from 1)."
    def __init__(self, epoch:int, batch:int): self.epoch_at, self.batch_at = epoch - 1, batch - 1
    def after_batch(self):
        if self.training and self.epoch == self.epoch_at and self.iter == self.batch_at: os.kill(os.getpid(), signal.SIGINT)

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
