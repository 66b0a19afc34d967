"fuse_bnet, TorchScript/ONNX export, learner export, bf16 training, channels_last and torch.compile for BNET models."
import pytest, torch, torchvision
import torch.nn.functional as F
from torch import nn
from copy import deepcopy
from fastai.vision.all import Learner, Callback, CrossEntropyLossFlat, load_learner
from bnet_fastai.layers import BNET
from bnet_fastai.models.xresnet import xresnet18, xresnet50, xse_resnet50
from bnet_fastai.deploy import fuse_bnet, export_onnx
from bnet_fastai.fastai_patches import enable_cpu_amp
from bnet_fastai.precision import bf16_conv_hazards
from _digits import digits_dls
from _bnet_ref import check_bnets_match_reference, KernelWatch

_bn = nn.modules.batchnorm._BatchNorm

def trained_like(model, seed=0):
    "Random running stats and BNET kernels, as training would leave them (fresh ones would make folding trivial)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _bn):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine: m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5); m.bias.normal_(0, 0.1, generator=g)
            if isinstance(m, BNET):
                m.conv.weight.add_(torch.randn(m.conv.weight.shape, generator=g) * 0.05); m.conv.bias.normal_(0, 0.1, generator=g)
    return model.eval()

def rel_err(a, b): return ((a - b).abs().max() / b.abs().max()).item()

def n_bn(model): return sum(isinstance(m, _bn) for m in model.modules())

def test_fuse_xresnet50_bnet():
    "Every norm of a BNET xresnet50 (a quarter of its width: the layout is the point) folds, and the result matches in fp32."
    m = trained_like(xresnet50(norm='bnet', n_out=10, widen=0.25))
    x = torch.randn(2, 3, 32, 32)
    # stem 3, 16 blocks × 3, 3 shortcut convs (at a quarter width the stem's 64 channels are the first block's 16×4): 54
    nb = sum(isinstance(l, BNET) for l in m.modules())
    f = fuse_bnet(m)
    rep = f.fuse_report
    assert len(rep.folded) == nb == 54 and not rep.left and all(k == 'BNET' for *_, k in rep.folded)
    assert n_bn(f) == 0 and n_bn(m) == nb  # every norm followed a conv directly; the original is untouched
    assert sum(isinstance(l, BNET) for l in f.modules()) == 0
    with torch.no_grad(): assert rel_err(f(x), m(x)) < 1e-4

def test_fuse_refuses_training_mode():
    with pytest.raises(ValueError, match=r"model\.eval\(\)"): fuse_bnet(xresnet18(norm='bnet'))

@pytest.mark.parametrize('make', [lambda: xresnet18(n_out=10), lambda: torchvision.models.resnet18(weights=None)], ids=['fastai_bn', 'torchvision_bn'])
def test_fuse_plain_bn(make):
    "Plain conv→BN pairs fold too, both in fastai's Sequential layers and in torchvision's attribute-style blocks (fp32)."
    m = trained_like(make())
    nb = n_bn(m)
    f = fuse_bnet(m)
    rep = f.fuse_report
    assert len(rep.folded) == nb and n_bn(f) == 0 and not rep.left
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert rel_err(f(x), m(x)) < 1e-4

def test_fuse_leaves_shared_conv_output():
    "A conv whose output also feeds a skip is not folded (the skip would change); the report says so (fp32)."
    class Skip(nn.Module):
        def __init__(self):
            super().__init__(); self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), BNET(4)
        def forward(self, x): y = self.conv(x); return self.norm(y) + y
    m = trained_like(Skip())
    f = fuse_bnet(m)
    rep = f.fuse_report
    assert not rep.folded and rep.left[0][0] == 'norm' and 'also feeds' in rep.left[0][1]
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(f(x), m(x))

@pytest.mark.slow
@pytest.mark.parametrize('fused', [False, True], ids=['unfused', 'fused'])
def test_torchscript_and_onnx_xse_resnet50(fused, tmp_path):
    "TorchScript and onnxruntime (fp32) match eager for a quarter-width xse_resnet50: SE blocks and BNET at every norm, as at full width."
    import onnxruntime as ort
    m = trained_like(xse_resnet50(norm='bnet', n_out=10, widen=0.25))
    if fused: m = fuse_bnet(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        ts = torch.jit.trace(m, x, check_trace=False)
        torch.testing.assert_close(ts(x), ref, atol=1e-4, rtol=1e-4)
    fname = export_onnx(m, x, tmp_path / 'model.onnx', check=False)
    sess = ort.InferenceSession(str(fname), providers=['CPUExecutionProvider'])
    x2 = torch.randn(3, 3, 32, 32)  # another batch size: the batch axis is dynamic
    for xb in (x, x2):
        got = torch.from_numpy(sess.run(None, {'input': xb.numpy()})[0])
        with torch.no_grad(): torch.testing.assert_close(got, m(xb), atol=1e-4, rtol=1e-4)

@pytest.mark.parametrize('fused', [False, True], ids=['unfused', 'fused'])
def test_torchscript_script_bnet(fused):
    "`torch.jit.script` (not just trace) compiles BNET models (fp32); fastai's SE blocks are not scriptable, so plain XResNet."
    m = trained_like(xresnet18(norm='bnet', n_out=10))
    if fused: m = fuse_bnet(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(torch.jit.script(m)(x), m(x), atol=1e-4, rtol=1e-4)

def test_learner_export_roundtrip(tmp_path):
    "A BNET learner exported and loaded gives bit-identical fp32 outputs."
    dls = digits_dls(size=16, n=200, bs=32, n_valid=64)
    learn = Learner(dls, trained_like(xresnet18(norm='bnet', n_out=10)), loss_func=CrossEntropyLossFlat(), path=tmp_path)
    learn.export('bnet.pkl')
    learn2 = load_learner(tmp_path / 'bnet.pkl')
    assert sum(isinstance(m, BNET) for m in learn2.model.modules()) == sum(isinstance(m, BNET) for m in learn.model.modules()) > 0
    xb = dls.one_batch()[0]
    learn.model.eval(); learn2.model.eval()
    with torch.no_grad(): torch.testing.assert_close(learn2.model(xb), learn.model(xb), atol=0, rtol=0)

def bnet_train_reference(b, x):
    "BNET-k in training, in plain fp32 torch maths: normalise with the batch's statistics (biased variance, no affine), then the depthwise conv."
    x = x.float(); dims = [0, *range(2, x.dim())]
    y = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + b.bn.eps)
    return getattr(F, f'conv{b.ndim}d')(y, b.conv.weight.float(), b.conv.bias.float(), padding=b.ks // 2, groups=b.nf)

class EveryBatch(Callback):
    "Runs `f` after every batch."
    def __init__(self, fn): super().__init__(); self.fn = fn
    def after_batch(self): self.fn()

@pytest.mark.slow
# bf16 at 24 px: below that a strided conv of xresnet18 sees a 1-pixel map, where PyTorch's CPU bf16 weight gradient is
# garbage (`bf16_conv_hazards`); fp16 is right there, and at 8 px (native) stays quick on CPUs without fp16 units.
@pytest.mark.parametrize('precision,dtype,size,n', [('to_bf16', torch.bfloat16, 24, 600), ('to_fp16', torch.float16, 8, 1100)])
def test_mixed_precision_training_digits(precision, dtype, size, n, request):
    "After `enable_cpu_amp()`, fastai's own `to_bf16()`/`to_fp16()` train a BNET model in that dtype on the CPU (fastai alone stays in fp32)."
    enable_cpu_amp()
    request.addfinalizer(lambda: enable_cpu_amp(False))
    # A quarter of the width: half-precision convolutions are slow on CPUs without bf16/fp16 units
    dls = digits_dls(size=size, n=n, bs=64, n_valid=300)
    learn = getattr(Learner(dls, xresnet18(norm='bnet', n_out=10, widen=0.25), loss_func=CrossEntropyLossFlat()), precision)()
    if dtype == torch.bfloat16: assert bf16_conv_hazards(learn.model, dls.one_batch()[0]) == []
    seen, scaling, errs = set(), set(), {}
    learn.add_cb(EveryBatch(lambda: scaling.add(learn.scaler.is_enabled()) if learn.training else None))
    kw = KernelWatch(learn.model)
    def check(b, i, o):
        "In each training batch (the last one's kept, when kernels have learned): output dtype, distance from BNET's maths in fp32."
        if not b.training: return
        seen.add(o.dtype)
        with torch.no_grad(), torch.autocast('cpu', enabled=False): errs[b] = rel_err(o.float(), bnet_train_reference(b, i[0]))
    hs = [b.register_forward_hook(check) for b in kw.bnets]
    with kw: learn.fit_one_cycle(1, 3e-3)
    for h in hs: h.remove()
    assert seen == {dtype}  # training really ran under autocast in that dtype
    assert scaling == {dtype == torch.float16}  # fp16 losses are scaled (on the CPU's scaler); bf16 needs no scaling
    # Each BNET computed BNET's maths within the dtype's rounding (bf16 keeps 8 mantissa bits, fp16 11) ...
    assert len(errs) == len(kw.bnets) and max(errs.values()) < (3e-2 if dtype == torch.bfloat16 else 5e-3), max(errs.values())
    # ... and its kernel learned: every kernel moved off its start (identity, or zero ending a residual branch), the
    # off-centre taps too wherever the map was larger than 1×1 (there they only ever see padding).
    n = kw.check()
    # After training, in eval and fp32, every BNET still computes BNET's maths on its running statistics.
    assert check_bnets_match_reference(learn.model, learn.dls.valid.one_batch()[0]) == n

def test_channels_last_and_half():
    "channels_last matches NCHW in fp32 (1e-4); bf16 and fp16 weights match fp32 within their rounding."
    m = trained_like(xresnet18(norm='bnet', n_out=10))
    f = fuse_bnet(m)
    x = torch.randn(2, 3, 16, 16)
    cl = torch.channels_last
    with torch.no_grad():
        ref = m(x)
        for model in (m, f):
            assert rel_err(deepcopy(model).to(memory_format=cl)(x.to(memory_format=cl)), ref) < 1e-4
            # Half precision keeps 8 (bf16) or 11 (fp16) mantissa bits: within a few percent of fp32.
            assert rel_err(deepcopy(model).bfloat16()(x.bfloat16()).float(), ref) < 5e-2
            assert rel_err(deepcopy(model).half()(x.half()).float(), ref) < 1e-2

@pytest.mark.slow
def test_torch_compile_matches_eager():
    "Compiled with the inductor (CPU: C++ via gcc) matches eager in fp32. A small model at a small input keeps compile time down on 2 cores."
    m = trained_like(xresnet18(norm='bnet', n_out=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(torch.compile(m)(x), m(x), atol=1e-4, rtol=1e-4)
