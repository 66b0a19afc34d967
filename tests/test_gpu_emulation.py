"CUDA conditions emulated on the CPU: the model moving after the optimizer is built, resume, TF32 in the ONNX check, and the GPU check script."
import os, subprocess, sys
from pathlib import Path
import pytest, torch
from torch import nn
import fastai.optimizer as fo
from fastai.data.load import DataLoader
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
import bnet_fastai
from bnet_fastai.layers import BNET
from bnet_fastai.optimizers import *

root = Path(__file__).resolve().parents[1]

class Float64Move(Callback):
    "Stands for fastai's move to the GPU: after `create_opt`, at `before_fit`, the model and each batch become float64."
    order = -10 # before TrainEvalCallback (0), like the device move it stands for
    def before_fit(self): self.learn.model.double()
    def before_batch(self): self.learn.xb = tuple(x.double() for x in self.xb)
    def after_pred(self): self.learn.pred = self.pred.float() # the loss and metrics stay float32, as fastai's recorder keeps them

def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BNET(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

def tiny_dls(n=12, bs=4):
    g = torch.Generator().manual_seed(0)
    ds = list(zip(torch.randn(n*bs, 3, 6, 6, generator=g), torch.randint(0, 3, (n*bs,), generator=g)))
    return DataLoaders(DataLoader(ds, bs=bs), DataLoader(ds[:bs], bs=bs))

# Every opt_func of the registry, Lookahead around one, and fastai's own optimizers as controls
OPT_FUNCS = {**opt_registry, "lookahead('ranger')": lookahead('ranger'), 'fastai.Adam': fo.Adam, 'fastai.ranger': fo.ranger}

def state_tensors(opt):
    "Every state tensor shaped like its parameter, with the parameter, in any of the wrappers."
    inner = getattr(opt, 'opt', opt)
    stores = [inner, getattr(inner, 'optimizer', None)]
    res = [(p, v) for s in stores if s is not None for p, st in s.state.items() if isinstance(p, torch.Tensor)
           for v in st.values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
    if isinstance(opt, fo.Lookahead): res += [(p, s) for sp, fp in zip(opt.slow_weights, opt.param_lists) for s, p in zip(sp, fp)]
    return res

@pytest.mark.parametrize('name', list(OPT_FUNCS))
def test_state_follows_a_move_after_create_opt(name):
    "12 steps (past Lookahead's k=6) after the model moved; the state then lives where the parameters do."
    learn = Learner(tiny_dls(), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=OPT_FUNCS[name], cbs=[Float64Move(), HessianBackward()])
    before = [p.detach().double().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.train_iter == 12
    ps = list(learn.model.parameters())
    assert all(p.dtype == torch.float64 for p in ps)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, ps)) # it trained
    st = state_tensors(learn.opt)
    assert st and all(v.dtype == p.dtype and v.device == p.device for p, v in st)
