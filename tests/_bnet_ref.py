"BNET written out in plain torch maths, a watch on whether its kernels learned, and probes of which path a BNET took: shared by the layer, convert, deploy, zoo and contract tests."
import torch
import torch.nn.functional as F
from bnet_fastai.layers import BNET

def bnet_reference(b, x):
    "BNET-k in plain torch maths, for eval mode: normalise with the running statistics (no affine), then a depthwise k×k conv with bias."
    if b.ndim == 1 and x.dim() == 2: return bnet_reference(b, x[..., None])[..., 0]
    shape = (1, -1) + (1,) * b.ndim
    y = (x - b.bn.running_mean.view(shape)) / torch.sqrt(b.bn.running_var.view(shape) + b.bn.eps)
    return getattr(F, f'conv{b.ndim}d')(y, b.conv.weight, b.conv.bias, padding=b.ks // 2, groups=b.nf)

def check_bnets_match_reference(model, x, tol=1e-5):
    "In eval mode (fp32), every BNET of `model` outputs what `bnet_reference` computes from its input; returns how many were checked."
    seen = []
    def hook(b, inp, out): seen.append((b, inp[0].clone(), out.clone()))  # copies: an in-place ReLU may come next
    hs = [b.register_forward_hook(hook) for b in model.modules() if isinstance(b, BNET)]
    model.eval()
    with torch.no_grad(): model(x)
    for h in hs: h.remove()
    for b, i, o in seen:
        torch.testing.assert_close(o, bnet_reference(b, i), rtol=tol, atol=tol * o.abs().max().item())
    return len(seen)

def off_centre(w):
    "The taps of depthwise kernels `w` (C, 1, k, ...) other than the centre: all zero in a converted BatchNorm."
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[(slice(None), 0) + (w.shape[-1] // 2,) * (w.dim() - 2)] = False
    return w[mask]

class KernelWatch:
    "While `model` trains inside `with`, records each BNET's starting kernel and the size of the maps it sees; `check()` then asserts every kernel learned."
    def __init__(self, model):
        self.bnets = [b for b in model.modules() if isinstance(b, BNET)]
        self.init = [b.conv.weight.detach().clone() for b in self.bnets]
        self.sizes = {} # BNET -> pixels of the first map it saw in training
    def _size(self, b, i, o):
        if b.training: self.sizes.setdefault(b, i[0].shape[2:].numel())  # returns None: the output stays as it is
    def __enter__(self):
        self.hooks = [b.register_forward_hook(self._size) for b in self.bnets]
        return self
    def __exit__(self, *exc):
        for h in self.hooks: h.remove()
    def check(self, tol=1e-4) -> int:
        """Every BNET trained and its kernel moved off its start (identity, or zero ending a residual branch), off-centre
        taps too wherever its map was larger than 1×1 (on a 1×1 map they only ever see padding). Returns how many."""
        assert self.bnets and len(self.sizes) == len(self.bnets), f'{len(self.sizes)} of {len(self.bnets)} BNETs ran in training'
        assert any(n > 1 for n in self.sizes.values()), 'no BNET saw a map larger than 1×1: off-centre taps untested'
        for i, (b, w0) in enumerate(zip(self.bnets, self.init)):
            w = b.conv.weight.detach()
            assert not torch.equal(w, w0), f'BNET {i} ({b.nf} channels): its kernel never moved'
            if self.sizes[b] > 1: assert off_centre(w - w0).abs().max() > tol, f'BNET {i}: its off-centre taps never learned'
        return len(self.bnets)

def is_lean(y):
    "Whether the lean path's backward node is in `y`'s graph."
    todo, seen = [y.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        if 'Lean' in type(f).__name__: return True
        seen.add(f); todo += [n for n, _ in f.next_functions]
    return False
