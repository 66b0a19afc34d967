"Precision choice: native bf16 from the CPU's flags, `auto` measures fp32 against native bf16 and leaves no trace, bf16 on an emulated-only GPU is refused. Capability queries are faked."
import copy, json, random, warnings, pytest, numpy as np, torch
from torch import nn
import bnet_fastai.precision as bp
from bnet_fastai.precision import choose_precision, precision_cbs, cpu_bf16_native, cuda_bf16_native, time_precisions, PrecisionChoice, MARGIN, bf16_conv_hazards
from bnet_fastai.train import train
from bnet_fastai.config import train_config
from bnet_fastai.cli import main

def fake_cpu(monkeypatch, native:bool=False, amx:bool=False, avx512:bool=False, arm:bool=False):
    "An x86 CPU with the given flags (`native`: AVX512-BF16), or an Arm CPU whose BF16 extension is `native`."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: native and not arm)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_supported', lambda: avx512 or native or amx)
    monkeypatch.setattr(bp, '_arm', lambda: arm)
    monkeypatch.setattr(bp, '_arm_bf16', lambda: native and arm)
    # the old query, true on every AVX512 CPU: a detection that still asked it would call AVX512 alone native
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: avx512 or native or amx)

class Probe:
    "A probe with fixed timings that records its calls."
    def __init__(self, **timings): self.timings, self.calls = timings, []
    def __call__(self, precisions):
        self.calls.append(list(precisions))
        return {p: self.timings[p] for p in precisions}

def fake_gpu(monkeypatch, native:bool, name='Tesla T4'):
    "A CUDA device; emulated-only bf16 (T4, V100) reports True only when emulation counts, as torch does."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)

@pytest.mark.parametrize('flags,native', [(dict(), False), (dict(avx512=True), False), (dict(native=True), True),
                                          (dict(amx=True), True), (dict(arm=True), False), (dict(arm=True, native=True), True)])
def test_cpu_bf16_native_from_flags(monkeypatch, flags, native):
    fake_cpu(monkeypatch, **flags)
    assert cpu_bf16_native() is native

def test_avx512_without_bf16_is_fp32(monkeypatch):
    "Skylake-SP, Cascade Lake: AVX512 (oneDNN says bf16) but no AVX512-BF16 or AMX; bf16 would be emulated."
    fake_cpu(monkeypatch, avx512=True)
    probe = Probe(fp32=2.0, bf16=1.0)
    prec, why = choose_precision('auto', 'cpu', probe=probe)
    assert prec == 'fp32' and why == 'auto: this CPU has no native bf16 (AVX512 without AVX512-BF16 or AMX emulates it)'
    assert probe.calls == []

@pytest.mark.parametrize('flags', [dict(native=True), dict(amx=True), dict(arm=True, native=True)])
def test_native_cpu_is_probed(monkeypatch, flags):
    fake_cpu(monkeypatch, **flags)
    probe = Probe(fp32=2.2, bf16=1.6)
    choice = choose_precision('auto', 'cpu', probe=probe)
    assert probe.calls == [['fp32', 'bf16']]
    assert choice == ('bf16', 'auto: bf16 1.6 s/step vs fp32 2.2 s/step -> bf16') and choice.timings == {'fp32': 2.2, 'bf16': 1.6}

def test_no_flags_no_probe(monkeypatch):
    fake_cpu(monkeypatch)
    probe = Probe(fp32=2.0, bf16=1.0)
    assert choose_precision('auto', 'cpu', probe=probe) == ('fp32', 'auto: this CPU has no native bf16')
    assert probe.calls == []

@pytest.mark.parametrize('bf16,want', [(3.0, 'fp32'), (1.0 * (1 - MARGIN) * 0.99, 'bf16'), (1.0 * (1 - MARGIN) * 1.01, 'fp32'), (1.0, 'fp32')])
def test_faked_timings(monkeypatch, bf16, want):
    "bf16 slower -> fp32; faster by more than the margin -> bf16; within the margin -> fp32."
    fake_cpu(monkeypatch, native=True)
    choice = choose_precision('auto', 'cpu', probe=Probe(fp32=1.0, bf16=bf16))
    assert choice.precision == want and choice.reason.endswith(f'-> {want}' + (f' (bf16 saves under {MARGIN:.0%})' if want == 'fp32' and bf16 < 1 else ''))
    assert PrecisionChoice(**json.loads(json.dumps(choice.as_dict()))) == choice # recorded and reused on resume

@pytest.mark.parametrize('native', [True, False])
def test_auto_on_cpu(monkeypatch, native):
    "Without a probe (before there is a model) native bf16 is taken unmeasured, and the reason says so."
    fake_cpu(monkeypatch, native=native)
    prec, why = choose_precision('auto')
    assert prec == ('bf16' if native else 'fp32') and 'this CPU' in why and (('not measured' in why) == native)

@pytest.mark.parametrize('native,name', [(True, 'NVIDIA H100'), (False, 'Tesla T4')])
def test_auto_on_gpu(monkeypatch, native, name):
    fake_gpu(monkeypatch, native, name)
    assert cuda_bf16_native() is native
    prec, why = choose_precision('auto')
    assert prec == ('bf16' if native else 'fp32') and name in why
    if native: assert choose_precision('bf16') == ('bf16', 'asked')
    assert choose_precision('fp16') == ('fp16', 'asked') and choose_precision('fp32') == ('fp32', 'asked')

def test_bf16_on_emulated_gpu_is_refused(monkeypatch):
    fake_gpu(monkeypatch, False, 'Tesla V100-SXM2-16GB')
    with pytest.raises(ValueError, match='bf16 on Tesla V100-SXM2-16GB is emulated only'): choose_precision('bf16')

def test_bnet_train_exits_with_one_line(monkeypatch, capsys, tmp_path):
    "`bnet-train --precision bf16` (and the deprecated `--bf16`) on an emulated-only GPU: one line, exit 2, nothing written."
    fake_gpu(monkeypatch, False)
    for args in (dict(precision='bf16'), dict(bf16=True)):
        with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
            warnings.simplefilter('ignore', DeprecationWarning)
            main(dataset='digits', norm='bn', epochs=1, out=str(tmp_path/'runs'), **args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["bnet-train: error: bf16 on Tesla T4 is emulated only (no native bf16 units); use precision fp16 or fp32"]
    assert not (tmp_path/'runs').exists()

def test_cpu_policy(monkeypatch):
    "On a CPU without bf16 units explicit bf16 runs (exact, slower) with a warning; fp16 needs CUDA."
    fake_cpu(monkeypatch)
    with pytest.warns(UserWarning, match='emulated'): assert choose_precision('bf16')[0] == 'bf16'
    with pytest.raises(ValueError, match='fp16 mixed precision needs a CUDA device'): choose_precision('fp16')
    with pytest.raises(ValueError, match="unknown precision 'half'; valid precisions: auto, fp32, bf16, fp16"): choose_precision('half')

def test_config_maps_the_old_flag(monkeypatch):
    fake_cpu(monkeypatch, native=True)
    with pytest.warns(DeprecationWarning, match='--precision bf16'): cfg = train_config(dataset='digits', bf16=True)
    assert cfg.precision == 'bf16'
    cfg = train_config(dataset='digits') # auto, on a CPU with bf16 units: left for `train` to measure on the models
    assert (cfg.precision, cfg.precision_asked) == ('auto', 'auto')
    with pytest.raises(ValueError, match="bf16=True contradicts precision='fp32'"): train_config(dataset='digits', bf16=True, precision='fp32')
    fake_cpu(monkeypatch)
    cfg = train_config(dataset='digits')
    assert (cfg.precision, cfg.precision_why) == ('fp32', 'auto: this CPU has no native bf16')

def test_callbacks():
    from fastai.callback.fp16 import MixedPrecision
    assert precision_cbs('fp32') == []
    for p in ('bf16', 'fp16'):
        cbs = precision_cbs(p, 'cuda')
        assert [type(c) for c in cbs] == [MixedPrecision] and cbs[0].amp_mode.value == p

def test_run_records_precision(monkeypatch, tmp_path):
    "config.json and summary.md say which precision ran and why."
    fake_cpu(monkeypatch)
    train(dataset='digits', arch='xresnet18', norm='bn', epochs=1, bs=128, out=tmp_path/'r')
    cfg = json.loads((tmp_path/'r'/'config.json').read_text())
    assert (cfg['precision'], cfg['precision_why']) == ('fp32', 'auto: this CPU has no native bf16')
    assert 'precision fp32 (auto: this CPU has no native bf16)' in (tmp_path/'r'/'summary.md').read_text()

@pytest.mark.parametrize('features,native', [('fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm', True),
                                             ('fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve', False)])
def test_arm_features(monkeypatch, features, native):
    "Linux on Arm lists the BF16 extension as `bf16` among each core's Features."
    import pathlib, platform
    monkeypatch.setattr(platform, 'system', lambda: 'Linux')
    monkeypatch.setattr(pathlib.Path, 'read_text', lambda self, *a, **k: f'processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {features}\n')
    assert bp._arm_bf16() is native

# ---- measuring leaves no trace ------------------------------------------------------------------------------------

from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.torch_core import set_seed
from bnet_fastai.layers import BNET
from bnet_fastai.optimizers import ranger

def tiny_learner():
    "Shuffled data, BatchNorm and BNET statistics, dropout and the library's Ranger (Lookahead state): everything a probe could disturb."
    g = torch.Generator().manual_seed(0)
    xy = [(torch.randn(3, 8, 8, generator=g), torch.tensor(i % 3)) for i in range(96)]
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BNET(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(128, 3))
    return Learner(DataLoaders.from_dsets(xy, xy[:32], bs=16, device='cpu'), net, loss_func=nn.CrossEntropyLoss(), opt_func=ranger)

def fit(learn, n):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, 1e-2)

def run(first:int, probe:bool, monkeypatch):
    "Train `first` epochs, then 3 - `first` more, in fp32; with `probe`, measure fp32 against bf16 for real in between."
    set_seed(0)
    learn = tiny_learner()
    if first: fit(learn, first)
    choice = None
    if probe:
        fake_cpu(monkeypatch, native=True) # so that `auto` measures on this CPU, whatever its flags
        opt, cbs = learn.opt, list(learn.cbs)
        choice = choose_precision('auto', 'cpu', probe=lambda ps: time_precisions(learn, ps))
        monkeypatch.undo()
        assert learn.opt is opt and list(learn.cbs) == cbs
    fit(learn, 3 - first)
    return learn, choice, (random.random(), np.random.rand(), torch.rand(1).item())

def opt_tensors(learn):
    sd = learn.opt.state_dict()
    sd = sd.get('base_optimizer', sd)
    return [v for s in sd['state'].values() for v in s.values() if isinstance(v, torch.Tensor)]

@pytest.mark.slow
@pytest.mark.parametrize('first', [0, 1])
def test_probe_leaves_no_trace(monkeypatch, first):
    "fp32 on the CPU: probing (real fp32 and bf16 steps) before training, or between epochs, then training gives the run without the probe to the bit."
    plain, _, rand_plain = run(first, False, monkeypatch)
    probed, choice, rand_probed = run(first, True, monkeypatch)
    assert set(choice.timings) == {'fp32', 'bf16'} and all(t > 0 for t in choice.timings.values())
    sp, sq = plain.model.state_dict(), probed.model.state_dict()
    assert all(torch.equal(sp[k], sq[k]) for k in sp) # weights, running statistics, num_batches_tracked
    assert [l.item() for l in plain.recorder.losses] == [l.item() for l in probed.recorder.losses]
    assert all(torch.equal(a, b) for a, b in zip(opt_tensors(plain), opt_tensors(probed)))
    assert rand_plain == rand_probed

def test_probe_with_no_optimizer_yet():
    "Before the first `fit` there is no optimizer, and the probe does not leave one."
    learn = tiny_learner()
    before = copy.deepcopy(learn.model.state_dict())
    res = time_precisions(learn, ['fp32'], n_steps=1, warmup=0)
    assert learn.opt is None and set(res) == {'fp32'}
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    with pytest.raises(ValueError, match="unknown precision 'half'; valid here: fp32, bf16, fp16"): time_precisions(learn, ['half'])

# ---- Learner.to_best_precision --------------------------------------------------------------------------------------

from fastai.callback.fp16 import MixedPrecision
from bnet_fastai.fastai_patches import enable_cpu_amp, mp_before_fit

@pytest.mark.parametrize('bf16,want', [(0.5, 'bf16'), (0.95, 'fp32'), (2.0, 'fp32')])
def test_to_best_precision(monkeypatch, request, bf16, want):
    "With native bf16 the faster precision is applied; bf16 on a CPU really autocasts (the Linear sees bf16 inputs)."
    request.addfinalizer(lambda: enable_cpu_amp(False))
    fake_cpu(monkeypatch, native=True)
    monkeypatch.setattr(bp, 'time_precisions', lambda learn, ps, **kw: {'fp32': 1.0, 'bf16': bf16})
    learn = tiny_learner()
    assert learn.to_best_precision() is learn and learn.to_best_precision() is learn # twice: still one callback
    assert learn.precision_choice.precision == want and learn.precision_choice.timings == {'fp32': 1.0, 'bf16': bf16}
    assert [cb.amp_mode.value for cb in learn.cbs if isinstance(cb, MixedPrecision)] == ([] if want == 'fp32' else ['bf16'])
    monkeypatch.undo()
    seen = set()
    learn.model[-1].register_forward_pre_hook(lambda m, inp: seen.add(inp[0].dtype))
    fit(learn, 1)
    assert seen == {torch.bfloat16 if want == 'bf16' else torch.float32}

def test_to_best_precision_without_native(monkeypatch):
    fake_cpu(monkeypatch, avx512=True)
    def probe(*args, **kwargs): raise AssertionError('measured without native bf16')
    monkeypatch.setattr(bp, 'time_precisions', probe)
    learn = tiny_learner().to_bf16()
    learn.to_best_precision()
    assert learn.precision_choice.precision == 'fp32' and 'AVX512 without' in learn.precision_choice.reason
    assert not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)

def test_clear_round_stops_the_probe(monkeypatch):
    "With `stop=clear_choice` a decisive first timed round ends the measurement: 4 steps instead of 6; a close call takes both rounds."
    from bnet_fastai.precision import clear_choice
    for bf16, n in ((0.5, 4), (0.9, 6)):
        calls = []
        def trainer(learn, xb, yb, p):
            def step(): calls.append(p); return {'fp32': 1.0, 'bf16': bf16}[p]
            return step
        monkeypatch.setattr(bp, '_trainer', trainer)
        assert time_precisions(tiny_learner(), stop=clear_choice) == {'fp32': 1.0, 'bf16': bf16} and len(calls) == n

# `train` resolves `auto`: measured on the real models where bf16 is native, recorded, reused on resume
import bnet_fastai.train as bt
from bnet_fastai.layers import BNET as _BNET
from bnet_fastai.train import resolve_precision
TINY = dict(dataset='digits', arch='mininet', size=24, epochs=1, bs=128) # the smallest arch at the least side where CPU bf16 is right: seconds per run

class FakeTimer:
    "`time_precisions` with fixed seconds per step for a model with BNETs and one without; records the norms it timed."
    def __init__(self, bn:dict, bnet:dict): self.t, self.calls = dict(bn=bn, bnet=bnet), []
    def __call__(self, learn, precisions, stop=None, **kw):
        k = 'bnet' if any(isinstance(m, _BNET) for m in learn.model.modules()) else 'bn'
        self.calls.append((k, list(precisions)))
        return {p: self.t[k][p] for p in precisions}

def _no_probe(*a, **k): raise AssertionError("the precision probe ran")

def test_train_measures_auto(monkeypatch, tmp_path, capsys):
    "Native bf16: each norm timed once, the times summed, so one precision serves both; recorded in config.json, summary.md and stdout."
    fake_cpu(monkeypatch, native=True)
    timer = FakeTimer(bn={'fp32': 1.0, 'bf16': 0.5}, bnet={'fp32': 1.0, 'bf16': 2.0}) # bn alone would take bf16
    monkeypatch.setattr(bt, 'time_precisions', timer)
    out = tmp_path/'r'
    train(norm='bn,bnet', out=out, **TINY)
    assert sorted(timer.calls) == [('bn', ['fp32', 'bf16']), ('bnet', ['fp32', 'bf16'])]
    cfg = json.loads((out/'config.json').read_text())
    why = 'auto: bf16 2.5 s/step vs fp32 2 s/step -> fp32'
    assert (cfg['precision'], cfg['precision_why'], cfg['precision_timings']) == ('fp32', why, {'fp32': 2.0, 'bf16': 2.5})
    assert cfg['precision_asked'] == 'auto' and cfg['precision_probe_s'] >= 0
    head = (out/'summary.md').read_text().splitlines()[0]
    assert f"precision fp32 ({why}; measured in " in head, head
    assert f"precision fp32 ({why}; measured in " in capsys.readouterr().out
    # (b) resume reuses the recorded choice: no second probe, the same record
    monkeypatch.setattr(bt, 'time_precisions', _no_probe)
    train(norm='bn,bnet', out=out, resume=True, **TINY)
    assert json.loads((out/'config.json').read_text())['precision_timings'] == {'fp32': 2.0, 'bf16': 2.5}
    # an explicit precision is obeyed, never probed: one other than the recorded one is refused
    with pytest.raises(ValueError, match=r"precision: 'fp32' there, 'bf16' now"): train(norm='bn,bnet', out=out, resume=True, precision='bf16', **TINY)
    train(norm='bn,bnet', out=out, resume=True, precision='fp32', **TINY)

def test_train_measures_bf16_faster(monkeypatch, tmp_path):
    "bf16 faster by more than the margin: the runs train in bf16 (fastai's MixedPrecision), and say so."
    fake_cpu(monkeypatch, native=True)
    monkeypatch.setattr(bt, 'time_precisions', FakeTimer(bn={'fp32': 2.2, 'bf16': 1.6}, bnet={}))
    used = []
    orig = bt.precision_cbs
    monkeypatch.setattr(bt, 'precision_cbs', lambda p: used.append(p) or orig(p))
    train(norm='bn', out=tmp_path/'r', **TINY)
    cfg = json.loads((tmp_path/'r'/'config.json').read_text())
    assert (cfg['precision'], cfg['precision_why']) == ('bf16', 'auto: bf16 1.6 s/step vs fp32 2.2 s/step -> bf16')
    assert used == ['fp32', 'bf16'] # the probe's learner is built in fp32, the run's in the precision chosen
    assert 'precision bf16 (auto: bf16 1.6 s/step vs fp32 2.2 s/step -> bf16; measured in' in (tmp_path/'r'/'summary.md').read_text()

def test_auto_without_native_equals_fp32(monkeypatch, tmp_path):
    "(fp32, CPU) No native bf16: `auto` is fp32 without a probe, and trains bit for bit as an explicit fp32."
    fake_cpu(monkeypatch)
    monkeypatch.setattr(bt, 'time_precisions', _no_probe)
    for p in ('auto', 'fp32'): train(norm='bnet', out=tmp_path/p, precision=p, **TINY)
    a, b = (torch.load(tmp_path/p/'bnet_s0'/'model.pth') for p in ('auto', 'fp32'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path/'auto'/'config.json').read_text())
    assert (cfg['precision'], cfg['precision_why'], cfg['precision_probe_s']) == ('fp32', 'auto: this CPU has no native bf16', None)

def test_no_native_no_probe(monkeypatch, tmp_path):
    "No native bf16: `train_config` resolves `auto` to fp32 itself and `resolve_precision` measures nothing."
    fake_cpu(monkeypatch)
    monkeypatch.setattr(bt, 'time_precisions', _no_probe)
    cfg = train_config(**{k: v for k, v in TINY.items()})
    assert cfg.precision == 'fp32' and resolve_precision(cfg, tmp_path) == cfg


# Where CPU bf16 goes wrong: a strided conv on a 1-pixel map (PyTorch's bf16 weight gradient is garbage there)

def test_bf16_conv_hazards_by_shape():
    "Exactly the convolutions that see one pixel along an axis they stride with a kernel wider than 1, whatever the dims."
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1),   # 2×2 in: two pixels, fine
                        nn.Conv2d(4, 4, 3, stride=2, padding=1),   # 1×1 in, stride 2: the hazard
                        nn.Conv2d(4, 4, 3, stride=1, padding=1),   # 1×1 in, stride 1: fine
                        nn.Conv2d(4, 4, 1, stride=2))              # 1×1 kernel: no tap sees only padding
    net.train()
    assert bf16_conv_hazards(net, torch.zeros(5, 3, 2, 2)) == ['1'] and net.training
    assert bf16_conv_hazards(net, torch.zeros(1, 3, 4, 4)) == []  # 4 → 2 → 1: the 1-pixel map meets only stride 1 or a 1×1 kernel
    c1 = nn.Sequential(nn.Conv1d(2, 2, 3, stride=2, padding=1))
    assert bf16_conv_hazards(c1, torch.zeros(1, 2, 1)) == ['0'] and bf16_conv_hazards(c1, torch.zeros(1, 2, 2)) == []

def test_auto_avoids_and_bf16_refuses_a_hazard(monkeypatch, tmp_path, capsys):
    "Native bf16, mininet at 16 px (its last strided conv sees 1 pixel): `auto` trains fp32 unmeasured and says why; `--precision bf16` is one line, exit 2, nothing written."
    fake_cpu(monkeypatch, native=True)
    monkeypatch.setattr(bt, 'time_precisions', _no_probe)
    out = tmp_path/'auto'
    train(norm='bnet', out=out, **{**TINY, 'size': 16})
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['precision'] == 'fp32' and cfg['precision_why'].startswith("auto: fp32, as bf16 on the CPU would train this model wrongly: ")
    assert "PyTorch's CPU bf16 weight gradient is garbage" in cfg['precision_why']
    args = ['--dataset', 'digits', '--arch', 'mininet', '--size', '16', '--precision', 'bf16', '--out', str(tmp_path/'bf16')]
    with pytest.raises(SystemExit) as e: main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('bnet-train: error: --precision bf16: bf16 on the CPU would train this model wrongly')
    assert not (tmp_path/'bf16').exists()
    main([*args[:5], '24', *args[6:], '--epochs', '1', '--bs', '128']) # 24 px: no hazard, bf16 trains
    assert json.loads((tmp_path/'bf16'/'config.json').read_text())['precision'] == 'bf16' and (tmp_path/'bf16'/'bnet_s0'/'model.pth').exists()
