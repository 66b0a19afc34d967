"Each activation against its formula written out in plain torch, its gradients, and `get_act`."
import copy, pytest, torch
from functools import partial
from torch import nn
from bnet_fastai.activations import Swish, Mila, BentID, act_registry, get_act

# The formulas, written out with nothing but exp, log, tanh and sqrt.
sigmoid  = lambda z: 1 / (1 + torch.exp(-z))
softplus = lambda z: torch.log1p(torch.exp(z))
REFS = {
    'swish':      (Swish(),                        lambda x: x * sigmoid(x)),
    'swish_b2':   (Swish(beta=2.),                 lambda x: x * sigmoid(2 * x)),
    'swish_lrn':  (Swish(beta=0.75, learnable=True), lambda x: x * sigmoid(0.75 * x)),
    'mila':       (Mila(),                         lambda x: x * torch.tanh(softplus(x - 0.25))),
    'mila_b1':    (Mila(beta=1.),                  lambda x: x * torch.tanh(softplus(x + 1))),
    'mila_b0':    (Mila(beta=0.),                  lambda x: x * torch.tanh(softplus(x))),  # Mish, this library's claim
    'bent_id':    (BentID(),                       lambda x: x + (torch.sqrt(x**2 + 1) - 1) / 2),
}

@pytest.mark.parametrize('name', REFS)
def test_matches_formula(name):
    act, ref = REFS[name]
    x = torch.randn(10_000) * 4
    # softplus written naively overflows past x≈88; 4σ keeps every value well inside.
    torch.testing.assert_close(act(x), ref(x), atol=1e-6, rtol=1e-6)
    # In float64 too, where rounding cannot hide a wrong constant.
    torch.testing.assert_close(copy.deepcopy(act).double()(x.double()), ref(x.double()), atol=1e-12, rtol=1e-12)

@pytest.mark.parametrize('name', REFS)
def test_gradcheck(name):
    act, _ = REFS[name]
    act = copy.deepcopy(act).double()
    x = (torch.randn(64, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(act, (x,))

def test_learnable_beta_gets_gradient():
    act = Swish(beta=0.5, learnable=True).double()
    x = torch.randn(200, dtype=torch.float64)
    act(x).sum().backward()
    b = 0.5; s = sigmoid(b * x)
    # d/dβ x·σ(βx) = x²·σ(βx)·(1−σ(βx))
    torch.testing.assert_close(act.beta.grad, (x * x * s * (1 - s)).sum())
    # gradcheck through the module itself, with β swapped in as the input
    beta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: torch.func.functional_call(act, {'beta': b}, (x,)), (beta,))

EXPECTED = {'relu': nn.ReLU, 'lrelu': nn.LeakyReLU, 'swish': Swish, 'silu': nn.SiLU, 'mila': Mila, 'mish': nn.Mish,
            'bent_id': BentID, 'gelu': nn.GELU}

def test_get_act_names():
    assert {n: get_act(n) for n in EXPECTED} == EXPECTED
    f = partial(Mila, beta=0.)
    assert get_act(f) is f

def test_register_act():
    from bnet_fastai.activations import register_act
    @register_act('test_tanh')
    class T(nn.Tanh): pass
    try: assert get_act('test_tanh') is T
    finally: act_registry.pop('test_tanh')
    with pytest.raises(ValueError, match='test_tanh'): get_act('test_tanh')

@pytest.mark.parametrize('bad', ['Mish', 'tanhexp', '', None, 3])
def test_get_act_bad_name(bad):
    with pytest.raises(ValueError) as e: get_act(bad)
    msg = str(e.value)
    assert repr(bad) in msg and all(n in msg for n in act_registry)

@pytest.mark.parametrize('name', REFS)
def test_output_on_input_device(name):
    "This library's activations, in every configuration above, compute where their input is."
    act = REFS[name][0]
    # meta tensors carry no data: any layer that moves its input to a fixed device fails or changes the device
    assert act(torch.empty(4, 5, device='meta')).device.type == 'meta'

def test_learnable_swish_moves_with_module():
    act = Swish(learnable=True).to('meta')
    assert act.beta.device.type == 'meta' and act(torch.empty(3, device='meta')).device.type == 'meta'
