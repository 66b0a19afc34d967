"Comparison statistics on hand-made runs whose answers are known: intervals against scipy's Student's t (`bnet_fastai.stats`), convergence epochs and times, stability and the reports (`bnet_fastai.compare`). Plain float maths (fp64 NumPy); no training."
import json, math
import numpy as np, pandas as pd, pytest
from scipy import stats
from bnet_fastai.stats import t_interval, paired, paired_diff, verdicts, loss_spike
from bnet_fastai.compare import (convergence, stability, load_runs,
                                 verdict_markdown, convergence_markdown, stability_markdown, comparison_markdown, comparison_lines,
                                 mark_convergence)

def hist(accs, losses):
    return pd.DataFrame(dict(epoch=range(1, len(accs)+1), train_loss=1.0, valid_loss=losses, accuracy=accs, time='00:01'))

def metrics(h, **kw): return dict(accuracy=float(h.accuracy.iloc[-1]), valid_loss=float(h.valid_loss.iloc[-1]), epochs=len(h), **kw)

# Four seeds, five epochs; bnet's final accuracy beats bn's by 1.0, 1.5, 0.5 and 1.2 points.
SEEDS = [0, 1, 2, 3]
BN = [hist([.50, .70, .80, .85, .900], [1.0, .80, .90, .60, .50]),  # loss rises by .10 after epoch 2
      hist([.52, .72, .81, .87, .905], [1.0, .70, .60, .55, .50]),  # never rises
      hist([.48, .69, .79, .84, .910], [1.0, .80, .70, .75, .60]),  # rises by .05
      hist([.51, .71, .80, .85, .895], [1.0, .80, .70, .60, .90])]  # rises by .30
BNET = [hist([.60, .87, .88, .90, .910], [.90, .60, .50, .45, .40]),
        hist([.62, .85, .89, .91, .920], [.90, .65, .50, .60, .45]),  # rises by .10
        hist([.58, .80, .87, .90, .915], [.90, .60, .55, .50, .45]),
        hist([.61, .88, .89, .90, .907], [.90, .60, .50, .45, .42])]
RESULTS = {'bn': [metrics(h, s_per_epoch=2.0) for h in BN],
           'bnet': [metrics(h, s_per_epoch=9.9, epoch_times=[4., 3., 3., 3., 3.]) for h in BNET]}
HISTS = {'bn': BN, 'bnet': BNET}

def ci_by_hand(d, conf=0.95):
    d = np.asarray(d, float); n = len(d)
    h = stats.t.ppf(1 - (1 - conf)/2, df=n-1) * d.std(ddof=1) / math.sqrt(n)
    return d.mean(), d.mean() - h, d.mean() + h

def test_accuracy_interval_is_students_t():
    d = paired_diff({n: [m['accuracy'] for m in ms] for n, ms in RESULTS.items()}, SEEDS, 'bnet', 'bn')
    m, lo, hi = ci_by_hand([1.0, 1.5, 0.5, 1.2])
    assert d.seeds == SEEDS and d.mean == pytest.approx(m) and d.low == pytest.approx(lo) and d.high == pytest.approx(hi)
    assert d.detected and lo > 0
    assert d.sentence() == f"bnet ahead of bn in accuracy by {m:.2f} points (95% CI {lo:.2f} to {hi:.2f}, 4 seeds)."

def test_interval_at_other_confidence():
    m, lo, hi = ci_by_hand([0.3, -0.2, 0.4], conf=0.9)
    assert t_interval([0.3, -0.2, 0.4], conf=0.9) == pytest.approx((m, lo, hi))
    with pytest.raises(ValueError, match='conf must be between 0 and 1'): t_interval([1., 2.], conf=95)

def test_undetectable_difference_says_so():
    d = paired_diff({'bn': [.90, .91, .92], 'bnet': [.91, .90, .93]}, [0, 1, 2], 'bnet', 'bn')
    m, lo, hi = ci_by_hand([1., -1., 1.])
    assert not d.detected and lo < 0 < hi
    assert d.sentence() == f"no difference in accuracy between bnet and bn detectable with 3 seeds (95% CI {lo:.2f} to {hi:.2f} points).".replace('-', '−')

def test_one_seed_no_interval_and_the_hint():
    d = paired_diff({'bn': [.90], 'bnet': [.92]}, [7], 'bnet', 'bn')
    assert (d.low, d.high, d.n) == (None, None, 1) and d.mean == pytest.approx(2.0)
    assert 'no interval' in d.sentence() and '`--seeds 0,1,2`' in d.sentence() and 'seed 7' in d.sentence()
    md = verdict_markdown({n: ms[:1] for n, ms in RESULTS.items()}, [0])
    assert '`--seeds 0,1,2`' in md and ' to ' not in md.split('\n\n')[2] # the table shows no interval

def test_pairs_only_common_seeds():
    common, d = paired({'bn': [.90, .91, .92, .93], 'bnet': [.95, .90]}, {'bn': [0, 1, 2, 3], 'bnet': [3, 1]}, 'bnet', 'bn')
    assert common == [3, 1] and d == pytest.approx([.02, -.01])
    with pytest.raises(ValueError, match="'bnet' has 2 runs but 3 seeds"): paired({'bn': [.9]*3, 'bnet': [.9]*2}, [0, 1, 2], 'bnet', 'bn')

def test_verdicts_cover_loss_and_spike():
    vs = {d.figure: d for d in verdicts(RESULTS, SEEDS, HISTS)}
    loss_d = [BNET[i].valid_loss.iloc[-1] - BN[i].valid_loss.iloc[-1] for i in range(4)]
    spike_d = [0 - .10, .10 - 0, 0 - .05, 0 - .30]
    for fig, d in (('valid_loss', loss_d), ('loss_spike', spike_d)):
        assert (vs[fig].mean, vs[fig].low, vs[fig].high) == pytest.approx(ci_by_hand(d))

def test_convergence_epochs_and_times():
    conv = convergence(HISTS, SEEDS, RESULTS)
    target = 0.95 * np.mean([.910, .920, .915, .907]) # bnet has the best final accuracy: 0.8653
    assert conv.attrs['target'] == pytest.approx(target)
    # bn reaches it at epochs 5, 4, 5, 5 (its epoch 4 accuracies: .85, .87, .84, .85); bnet at 2, 3, 3, 2
    assert conv.loc['bn', 'epoch'] == pytest.approx(4.75) and conv.loc['bn', 'epoch_std'] == pytest.approx(np.std([5, 4, 5, 5], ddof=1))
    assert conv.loc['bnet', 'epoch'] == pytest.approx(2.5)
    assert conv.loc['bn', 'time_s'] == pytest.approx(2.0 * 4.75) # s_per_epoch × epochs without epoch_times
    assert conv.loc['bnet', 'time_s'] == pytest.approx(np.mean([7., 10., 10., 7.])) # sums of epoch_times
    assert list(conv.never) == [[], []]

def test_runs_that_never_reach_are_reported():
    conv = convergence(HISTS, SEEDS, RESULTS, target=0.905)
    assert conv.loc['bn', 'reached'] == 2 and conv.loc['bn', 'never'] == [0, 3] and conv.loc['bn', 'epoch'] == 5
    assert 'seeds 0, 3 never reach it in 5 epochs' in convergence_markdown(HISTS, SEEDS, RESULTS, target=0.905)
    none = convergence(HISTS, SEEDS, RESULTS, target=0.99)
    assert list(none.reached) == [0, 0] and none.loc['bnet', 'never'] == SEEDS
    with pytest.raises(ValueError, match='target must be a valid accuracy between 0 and 1'): convergence(HISTS, SEEDS, target=90)

def test_stability_figures():
    st = stability(RESULTS, HISTS)
    assert [loss_spike(h) for h in BN] == pytest.approx([.10, 0., .05, .30])
    assert st.loc['bn', 'loss_spike'] == pytest.approx(.1125) and st.loc['bnet', 'loss_spike'] == pytest.approx(.025)
    assert st.loc['bn', 'accuracy_std'] == pytest.approx(100 * np.std([.900, .905, .910, .895], ddof=1))

def test_reports():
    md = comparison_markdown(RESULTS, HISTS, SEEDS)
    for head in ('## Against the baseline: bn', '## Convergence', '## Stability'): assert head in md
    lines = comparison_lines(RESULTS, HISTS, SEEDS)
    assert lines[0].startswith('verdict: bnet ahead of bn in accuracy by 1.05 points')
    assert any(l.startswith('convergence: bnet reaches 86.7% valid accuracy at epoch 2.5 ± 0.6, after 8.5 ± 1.7 s') for l in lines)
    assert all('\n' not in l for l in lines)

def test_load_runs(tmp_path):
    (tmp_path/'config.json').write_text(json.dumps(dict(norms=['bn', 'bnet'], seeds=SEEDS)))
    for n in ('bn', 'bnet'):
        for s in SEEDS:
            d = tmp_path/f'{n}_s{s}'; d.mkdir()
            HISTS[n][s].to_csv(d/'history.csv', index=False)
            if (n, s) != ('bnet', 2): (d/'metrics.json').write_text(json.dumps(RESULTS[n][s]))
    res, hs, seeds = load_runs(tmp_path)
    assert seeds == {'bn': SEEDS, 'bnet': [0, 1, 3]} and len(hs['bnet']) == 3
    assert verdicts(res, seeds)[0].seeds == [0, 1, 3]

def test_mark_convergence_draws_at_target():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    conv = convergence(HISTS, SEEDS, RESULTS)
    mark_convergence(ax, conv)
    assert ax.lines[0].get_ydata()[0] == pytest.approx(100 * conv.attrs['target'])
    xs = sorted(c.lines[0].get_xdata()[0] for c in ax.containers) # one errorbar per norm, at its mean epoch
    assert xs == pytest.approx([2.5, 4.75])
    plt.close(fig)
