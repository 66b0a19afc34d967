"BNET written out in plain torch maths, and probes of which path a BNET took: shared by the layer, convert, deploy and zoo tests."
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

def is_lean(y):
    "Whether the lean path's backward node is in `y`'s graph."
    todo, seen = [y.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        if 'Lean' in type(f).__name__: return True
        seen.add(f); todo += [n for n, _ in f.next_functions]
    return False
