"What BNET's kernels learned: the off-centre share against hand-set kernels and plain torch sums (fp32 weights)."
import pytest, torch, torchvision
from torch import nn
from bnet_fastai.layers import BNET
from bnet_fastai.models.xresnet import xresnet18
from bnet_fastai.convert import convert_to_bnet
from bnet_fastai.kernels import bnet_kernel_summary, kernel_line, plot_bnet_kernels

def converted(model, **kw):
    "`convert_to_bnet`'s model, whether it returns `(model, report)` or the model alone."
    res = convert_to_bnet(model, **kw)
    return res[0] if isinstance(res, tuple) else res

def test_fresh_bnet_has_nothing_off_centre():
    s = bnet_kernel_summary(xresnet18(n_out=10, norm='bnet'))
    assert len(s) == 22 and list(s.layer) == list(range(1, 23))
    assert (s.off_centre == 0).all()
    assert (s[~s.zero_init].centre_mean == 1).all() and (s[s.zero_init].weight_abs == 0).all()
    assert list(s.part[:3]) == ['stem'] * 3 and (s.part[3:] == 'block').all()
    assert kernel_line(s) == "BNET kernels: 0% of weight off-centre (layers 4–22), 0% in the stem (layers 1–3)"

def test_set_kernel_gives_its_share():
    m = xresnet18(n_out=10, norm='bnet5')
    name, b = next((n, b) for n, b in m.named_modules() if isinstance(b, BNET) and n.startswith('5.'))
    with torch.no_grad():
        w = torch.randn_like(b.conv.weight); b.conv.weight.copy_(w)
    s = bnet_kernel_summary(m).set_index('name')
    a = w.abs()
    assert s.loc[name, 'ks'] == 5
    assert s.loc[name, 'off_centre'] == pytest.approx(1 - (a[:, :, 2, 2].sum() / a.sum()).item(), rel=1e-5)
    assert s.loc[name, 'centre_mean'] == pytest.approx(w[:, 0, 2, 2].mean().item(), abs=1e-6)
    assert (s.drop(name).off_centre == 0).all()

def test_summary_follows_depth_order():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), BNET(4), nn.Conv2d(4, 8, 3), BNET(8, ks=7))
    s = bnet_kernel_summary(m)
    assert list(s.name) == ['1', '3'] and list(s.ks) == [3, 7] and list(s.nf) == [4, 8] and set(s.part) == {'layer'}

def test_converted_bn_model_starts_at_zero():
    m = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad(): # a BN with non-trivial γ: the centre tap takes γ, the other taps stay 0
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d): bn.weight.uniform_(0.5, 1.5)
    s = bnet_kernel_summary(converted(m))
    assert len(s) == 20 and (s.off_centre == 0).all()
    assert s.centre_mean[0] == pytest.approx(m.bn1.weight.mean().item(), abs=1e-6)
    assert s.part[0] == 'stem' and (s.part[1:] == 'block').all()

def test_errors_and_plot(tmp_path):
    with pytest.raises(ValueError, match='holds no BNET layer'): bnet_kernel_summary(torchvision.models.resnet18())
    with pytest.raises(ValueError, match='summaries must be a non-empty dict'): plot_bnet_kernels({}, tmp_path/'k.png')
    f = plot_bnet_kernels({'bnet': xresnet18(n_out=10, norm='bnet'), 'bnet5': xresnet18(n_out=10, norm='bnet5')}, tmp_path/'k.png')
    assert f.stat().st_size > 5000
