"Precision choice: `auto` takes bf16 only on native bf16 hardware; bf16 on an emulated-only GPU is refused. Capability queries are mocked."
import json, warnings, pytest, torch
from bnet_fastai.precision import choose_precision, precision_cbs, cpu_bf16_native, cuda_bf16_native
from bnet_fastai.train import train_config, train, main

def fake_cpu(monkeypatch, native:bool):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)

def fake_gpu(monkeypatch, native:bool, name='Tesla T4'):
    "A CUDA device; emulated-only bf16 (T4, V100) reports True only when emulation counts, as torch does."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)

@pytest.mark.parametrize('native', [True, False])
def test_auto_on_cpu(monkeypatch, native):
    fake_cpu(monkeypatch, native)
    assert cpu_bf16_native() is native
    prec, why = choose_precision('auto')
    assert prec == ('bf16' if native else 'fp32') and 'this CPU' in why

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
    fake_cpu(monkeypatch, False)
    with pytest.warns(UserWarning, match='emulated'): assert choose_precision('bf16')[0] == 'bf16'
    with pytest.raises(ValueError, match='fp16 mixed precision needs a CUDA device'): choose_precision('fp16')
    with pytest.raises(ValueError, match="unknown precision 'half'; valid precisions: auto, fp32, bf16, fp16"): choose_precision('half')

def test_config_maps_the_old_flag(monkeypatch):
    fake_cpu(monkeypatch, True)
    with pytest.warns(DeprecationWarning, match='--precision bf16'): cfg = train_config(dataset='digits', bf16=True)
    assert cfg.precision == 'bf16'
    assert train_config(dataset='digits').precision == 'bf16' # auto, on a CPU with bf16 units
    with pytest.raises(ValueError, match='--bf16 contradicts --precision fp32'): train_config(dataset='digits', bf16=True, precision='fp32')
    fake_cpu(monkeypatch, False)
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
    fake_cpu(monkeypatch, False)
    train(dataset='digits', arch='xresnet18', norm='bn', epochs=1, bs=128, out=tmp_path/'r')
    cfg = json.loads((tmp_path/'r'/'config.json').read_text())
    assert (cfg['precision'], cfg['precision_why']) == ('fp32', 'auto: this CPU has no native bf16')
    assert 'precision fp32 (auto: this CPU has no native bf16)' in (tmp_path/'r'/'summary.md').read_text()
