"Norm placement: branch ends of fastai, torchvision and timm blocks, `bnet_at='last'`, the deprecated `at=`, and the one check."
import subprocess, sys, pytest, torch, timm, torchvision
from torch import nn
from fastai.vision.models import xresnet as fx
import bnet_fastai  # applies the fastai patches
from bnet_fastai.layers import BNET
from bnet_fastai.placement import branch_last_norms, bn_sites, check_placement, placements, batchnorm_types
from bnet_fastai.models.xresnet import set_norms, xresnet18
from bnet_fastai.models.zoo import mininet
from bnet_fastai.convert import convert_to_bnet

def zero_init_bns(model):
    "Names of the BatchNorms whose γ is all zero: where the model's own library starts each residual branch at zero."
    return [n for n, m in model.named_modules() if isinstance(m, batchnorm_types) and m.affine and not m.weight.any()]

def names_of(model, objs):
    ids = {id(o) for o in objs}
    return [n for n, m in model.named_modules() if id(m) in ids]

# Each library zero-initialises exactly the norm ending each residual branch: fastai always (`BatchZero`),
# torchvision with `zero_init_residual=True`, timm by default (`zero_init_last`). Block counts from the layer lists.
MODELS = dict(fastai_xresnet50=(lambda: fx.xresnet50(), 3+4+6+3),
              fastai_xse_resnext18=(lambda: fx.xse_resnext18(), 2+2+2+2),
              torchvision_resnet50=(lambda: torchvision.models.resnet50(zero_init_residual=True), 3+4+6+3),
              torchvision_resnet18=(lambda: torchvision.models.resnet18(zero_init_residual=True), 2+2+2+2),
              timm_resnet26d=(lambda: timm.create_model('resnet26d'), 2+2+2+2),
              timm_resnest14d=(lambda: timm.create_model('resnest14d'), 1+1+1+1))

@pytest.mark.parametrize('name', list(MODELS))
def test_branch_ends_are_the_zero_initialised_norms(name):
    make, n_blocks = MODELS[name]
    m = make()
    ends = branch_last_norms(m)
    assert len(ends) == n_blocks
    assert names_of(m, ends) == zero_init_bns(m)

@pytest.mark.parametrize('name', ['fastai_xse_resnext18', 'torchvision_resnet18', 'timm_resnest14d'])
def test_bnet_at_last_replaces_exactly_the_branch_ends(name):
    m = MODELS[name][0]()
    want, n_bn = zero_init_bns(m), sum(isinstance(o, batchnorm_types) for o in m.modules())
    set_norms(m, 'bnet', bnet_at='last')
    assert [n for n, o in m.named_modules() if isinstance(o, BNET)] == want
    assert sum(isinstance(o, batchnorm_types) and not isinstance(p, BNET) for p in m.modules() for o in p.children()) == n_bn - len(want)
    assert all(o.zero for o in m.modules() if isinstance(o, BNET))
    new = convert_to_bnet(MODELS[name][0](), bnet_at='last'); rep = new.convert_report
    assert rep.converted == want and rep.bnet_at == 'last'

def test_identity_branch_end_is_skipped():
    block = timm.models.resnet.BasicBlock(8, 8)
    assert names_of(block, branch_last_norms(block)) == ['bn2']
    block.bn2 = nn.Identity()
    assert branch_last_norms(block) == []

def test_set_norms_leaves_bnets_inner_batchnorm():
    "A model that already holds BNETs keeps them: their inner BatchNorm is never a site."
    m = xresnet18(norm='bnet')
    n = sum(isinstance(o, BNET) for o in m.modules())
    set_norms(m, 'bnet5')
    assert sum(isinstance(o, BNET) for o in m.modules()) == n
    assert not any(isinstance(o.bn, BNET) for o in m.modules() if isinstance(o, BNET))

def test_at_is_deprecated_and_still_works():
    with pytest.warns(DeprecationWarning, match=r"set_norms\(at=\.\.\.\) is deprecated.*bnet_at"):
        m = set_norms(torchvision.models.resnet18(), 'bnet', at='last')
    assert sum(isinstance(o, BNET) for o in m.modules()) == 8
    with pytest.warns(DeprecationWarning, match=r"convert_to_bnet\(at=\.\.\.\) is deprecated.*bnet_at"):
        rep = convert_to_bnet(torchvision.models.resnet18(), at='last').convert_report
    assert rep.n_converted == 8
    with pytest.warns(DeprecationWarning, match='bnet_at'): assert rep.at == 'last'

MSG = "unknown bnet_at='first'; valid choices: 'all', 'last'"
@pytest.mark.parametrize('call', [
    lambda: check_placement('first'),
    lambda: bn_sites(nn.BatchNorm2d(3), 'first'),
    lambda: set_norms(nn.Sequential(nn.BatchNorm2d(3)), 'bnet', bnet_at='first'),
    lambda: convert_to_bnet(nn.Sequential(nn.BatchNorm2d(3)), bnet_at='first'),
    lambda: xresnet18(norm='bnet', bnet_at='first'),
    lambda: mininet(norm='bnet', bnet_at='first'),
])
def test_bad_placement_message(call):
    with pytest.raises(ValueError) as e: call()
    assert str(e.value) == MSG
    assert placements == ('all', 'last')

def test_bnet_at_last_without_branch_end():
    with pytest.raises(ValueError, match="bnet_at='last' found no residual branch ending in a norm.*use bnet_at='all'"):
        set_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), 'bnet', bnet_at='last')

def test_import_stays_light():
    "Importing the BNET layer (and finding branch ends in a fastai model) loads neither timm, accelerate nor fastai.distributed."
    code = ("import sys, bnet_fastai.layers\nfrom bnet_fastai.placement import branch_last_norms\n"
            "from fastai.vision.models.xresnet import xresnet18\nassert len(branch_last_norms(xresnet18())) == 8\n"
            "print(sorted(m for m in ('timm', 'accelerate', 'fastai.distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'
