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
from bnet_fastai.data import digits_dls as bnet_digits_dls

root = Path(__file__).resolve().parents[1]

class Float64Move(Callback):
    "Stands for fastai's move to the GPU: after `create_opt`, at `before_fit`, the model and each batch become float64."
    order = -10 # before TrainEvalCallback (0), like the device move it stands for
    def before_fit(self): self.learn.model.double()
    def before_batch(self): self.learn.xb = tuple(x.double() for x in self.xb)
    def after_pred(self): self.learn.pred = self.pred.float() # the loss and metrics stay float32, as fastai's recorder keeps them

def tiny_net(n_out=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BNET(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, n_out))

def tiny_dls(n=12, bs=4):
    g = torch.Generator().manual_seed(0)
    ds = list(zip(torch.randn(n*bs, 3, 6, 6, generator=g), torch.randint(0, 3, (n*bs,), generator=g)))
    return DataLoaders(DataLoader(ds, bs=bs), DataLoader(ds[:bs], bs=bs))

# Every opt_func of the registry and Lookahead around one. fastai's own optimizers are not ours to check: their state
# keeps the dtype it was created in.
OPT_FUNCS = {**opt_registry, "lookahead('ranger')": lookahead('ranger')}

def state_tensors(opt):
    "Every floating-point state tensor, with its parameter, in any of the wrappers."
    inner = getattr(opt, 'opt', opt)
    stores = [inner, getattr(inner, 'optimizer', None)]
    res = [(p, v) for s in stores if s is not None for p, st in s.state.items() if isinstance(p, torch.Tensor)
           for k, v in st.items() if k != 'step' and isinstance(v, torch.Tensor) and v.is_floating_point()]
    if isinstance(opt, fo.Lookahead): res += [(p, s) for sp, fp in zip(opt.slow_weights, opt.param_lists) for s, p in zip(sp, fp)]
    return res

@pytest.mark.parametrize('name', list(OPT_FUNCS))
def test_state_follows_a_move_after_training(name):
    "An epoch in float32 builds the optimizer state; then the model moves and trains 12 more steps (past Lookahead's k=6): the state lives where the parameters do."
    learn = Learner(tiny_dls(), tiny_net(), loss_func=nn.CrossEntropyLoss(), opt_func=OPT_FUNCS[name])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    st = state_tensors(learn.opt)
    assert st and all(v.dtype == torch.float32 for p, v in st) # there is state to move, built before the move
    before = [p.detach().double().clone() for p in learn.model.parameters()]
    learn.add_cb(Float64Move())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.train_iter == 12
    ps = list(learn.model.parameters())
    assert all(p.dtype == torch.float64 for p in ps)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, ps)) # it trained after the move
    st = state_tensors(learn.opt)
    assert st and all(v.dtype == p.dtype and v.device == p.device for p, v in st)

# ---- resume ---------------------------------------------------------------------------------------------------

import bnet_fastai.train as bt
from bnet_fastai.train import train, train_run
from bnet_fastai.config import train_config

class Interrupted(Exception): pass

class StopAfterEpoch(Callback):
    "A kill after the first epoch's checkpoint is written."
    order = bt.EpochCheckpoint.order + 1
    def after_epoch(self): raise Interrupted('stopped after epoch 1')

@pytest.fixture
def moved_learner(monkeypatch):
    "Every `Learner` that `bnet-train` builds gets a tiny BNET model that moves to float64 at `before_fit`; `stop[0]` also interrupts it after epoch 1."
    stop, build = [False], bt.build_learner
    # 192 training digits at 16 px, 6 steps an epoch: epoch 2 crosses Lookahead's k=6 and the test stays quick on two cores
    monkeypatch.setattr(bt, 'get_dls', small_digits)
    def _build(*args, **kwargs):
        learn = build(*args, **kwargs)
        learn.model = tiny_net(10) # float64 convolutions on the CPU are slow; the optimizer state is what is tested
        learn.add_cbs([Float64Move()] + ([StopAfterEpoch()] if stop[0] else []))
        return learn
    monkeypatch.setattr(bt, 'build_learner', _build)
    return stop

def small_digits(cfg, check=True, **kwargs): # the stand-in for `get_dls`, whose other options do not apply
    dls = bnet_digits_dls(16, 32)
    dls.train.n, dls.valid.n = 192, 64 # fastai's DataLoader draws its batches from the first `n` items
    return dls

RESUME = dict(dataset='digits', arch='xresnet18', norm='bnet', epochs=2, size=16, bs=32, precision='fp32')

def interrupt_and_resume(run, run_dir, stop):
    "Run to the end of epoch 1 and stop there, then resume to the end; return the last checkpoint."
    stop[0] = True
    with pytest.raises(Interrupted): run(False)
    assert torch.load(run_dir/'checkpoint.pth', map_location='cpu', weights_only=False)['epoch'] == 1
    stop[0] = False
    run(True)
    return torch.load(run_dir/'checkpoint.pth', map_location='cpu', weights_only=False)

def check_resumed(ck):
    assert ck['epoch'] == 2 and len(ck['values']) == 2
    opt = ck['opt'].get('base_optimizer', ck['opt'])
    st = [v for s in opt['state'].values() for k, v in s.items() if k != 'step' and isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert st and all(v.dtype == torch.float64 for v in st)

@pytest.mark.parametrize('name', [*opt_registry, "lookahead('ranger')"])
def test_resume_after_the_model_moved(name, moved_learner, tmp_path):
    "`train_run(resume=True)` (what `bnet-train --resume` runs) from epoch 1 of 2, with the float64 move standing for the GPU."
    cfg, rd = train_config(opt=OPT_FUNCS[name], **RESUME), tmp_path/'bnet_s0'
    check_resumed(interrupt_and_resume(lambda resume: train_run(cfg, 'bnet', 0, rd, resume=resume), rd, moved_learner))

def test_bnet_train_resume_after_the_model_moved(moved_learner, tmp_path):
    "The same through `bnet-train`'s `train`, with the README's optimizer."
    out = tmp_path/'r'
    # --keep-checkpoints: a finished run otherwise keeps only its weights, and the optimizer state is what is checked
    check_resumed(interrupt_and_resume(lambda resume: train(out=out, resume=resume, keep_checkpoints=True, opt='ranger_lars', **RESUME), out/'bnet_s0', moved_learner))

# ---- ONNX check under TF32 ------------------------------------------------------------------------------------

import bnet_fastai.deploy as bd

class EagerTF32Error(nn.Module):
    "Eager output off by TF32's error on an xresnet18's logits (2e-3); the exported graph computes the exact value."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x):
        y = self.m(x)
        return y if torch.onnx.is_in_onnx_export() else y + 2e-3

def test_tf32_rule(monkeypatch):
    "TF32 runs on CUDA devices of compute capability 8+ while any of torch's three switches allows it, and never on the CPU."
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (9, 0))
    cuda = torch.device('cuda')
    # Set and restored by hand: torch's switches are properties of module objects, which pytest 9's monkeypatch cannot undo.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for cudnn, matmul, prec, want in [(True, False, 'highest', True), (False, True, 'highest', True),
                                          (False, False, 'high', True), (False, False, 'highest', False)]:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
            monkeypatch.setattr(torch, 'get_float32_matmul_precision', lambda p=prec: p)
            assert bd._tf32(cuda) == want and not bd._tf32(torch.device('cpu'))
    finally: torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (7, 0)) # V100: the switches do nothing
    assert not bd._tf32(cuda)

def test_onnx_check_tolerates_tf32(monkeypatch):
    "With eager in TF32 the default check passes; in exact float32 the same error still fails it."
    pytest.importorskip('onnxruntime')
    m, x = EagerTF32Error(tiny_net().eval()).eval(), torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match='differs from eager'): bd.export_onnx(m, x)
    monkeypatch.setattr(bd, '_tf32', lambda device: True)
    assert bd.export_onnx(m, x)[:2] == b'\x08\x08'
    with pytest.raises(RuntimeError, match='atol=0.0001'): bd.export_onnx(m, x, atol=1e-4)

# ---- the real-device script -----------------------------------------------------------------------------------

def test_gpu_check_script_runs():
    "benchmarks/gpu_check.py imports and, without CUDA, says it skipped and exits 0."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]), 'CUDA_VISIBLE_DEVICES': ''}
    r = subprocess.run([sys.executable, str(root/'benchmarks'/'gpu_check.py')], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'no CUDA device: skipped' in r.stdout
