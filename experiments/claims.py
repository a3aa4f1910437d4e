"""The claim rules of the reproduction report: one pure function per FedGen-Edge claim.

Each ``claim_*`` maps measured numbers to (verdict, why). Verdicts: 'holds', 'does not hold',
'inconclusive' and 'not testable here'. experiments/report.py applies them to a reproduce run.

The noise model is the seed spread. Two sets of per-seed values a, b (each n >= 2) are
*separated* when their mean +- std intervals do not overlap:

    mean(a) + std(a) < mean(b) - std(b)    (a measurably lower than b), or the mirror image,

with std the sample standard deviation (n - 1). A comparison with n = 1 on either side has no
spread, so it can neither hold nor fail on seed grounds: it is inconclusive, and the why says
which way the means point. Claim 1 (uplink) counts bytes exactly; it has no seed noise.
"""
import statistics

import numpy as np

HOLDS, FAILS, UNSURE, UNTESTABLE = 'holds', 'does not hold', 'inconclusive', 'not testable here'
LOWER, HIGHER, WITHIN, SINGLE = 'lower', 'higher', 'within spread', 'n = 1'


def std(v: list) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values."""
    return statistics.stdev(v) if len(v) > 1 else 0.0


def finite(v) -> list:
    """The finite numbers of ``v`` (None, NaN and inf dropped); a scalar is one seed."""
    v = v if isinstance(v, (list, tuple)) else [v]
    return [float(x) for x in v if x is not None and np.isfinite(x)]


def compare(a: list, b: list) -> str:
    """Where per-seed values ``a`` lie against ``b``: LOWER / HIGHER when the mean +- std
    intervals are disjoint (both n >= 2), WITHIN when they overlap, SINGLE when either side has
    one value (no spread to judge by). Raises ValueError on an empty side."""
    if not a or not b:
        raise ValueError(f'compare: both sides need a value, got {len(a)} and {len(b)}')
    if len(a) < 2 or len(b) < 2:
        return SINGLE
    ma, mb, sa, sb = statistics.fmean(a), statistics.fmean(b), std(a), std(b)
    if ma + sa < mb - sb:
        return LOWER
    if ma - sa > mb + sb:
        return HIGHER
    return WITHIN


def _ms(v: list) -> str:
    """'mean ± std (n = k)' of per-seed values, or 'x (n = 1)' for one seed."""
    m = statistics.fmean(v)
    return f'{m:.4g} (n = 1)' if len(v) == 1 else f'{m:.4g} ± {std(v):.2g} (n = {len(v)})'


def bootstrap_share(improved, reps: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """(share, lo, hi): share = mean(improved [K] bool) and its percentile bootstrap CI from
    ``reps`` resamples of the K clients with replacement (numpy, seeded)."""
    x = np.asarray(improved, np.float64)
    if not len(x):
        return float('nan'), float('nan'), float('nan')
    idx = np.random.default_rng(seed).integers(0, len(x), (reps, len(x)))
    shares = x[idx].mean(1)
    q = (1 - level) / 2
    return float(x.mean()), float(np.quantile(shares, q)), float(np.quantile(shares, 1 - q))


def claim_uplink(whole: float, blocks: float) -> tuple[str, str]:
    """Claim 1 holds when the whole-model uplink reduction exceeds 99% (bytes are counted, not
    sampled: no seed noise)."""
    if not np.isfinite(whole):
        return UNTESTABLE, 'no uplink measured'
    verdict = HOLDS if whole > 0.99 else FAILS
    return verdict, (f'reduction {100 * whole:.2f}% whole model (rule: > 99%); '
                     f'{100 * blocks:.2f}% against the transformer blocks alone')


def claim_lower(ours: list, base: list, metric: str) -> tuple[str, str]:
    """Claims 2/3: FedGen-Edge's final ``metric`` (per seed) is lower than full FedAvg's.
    Holds when ours is measurably lower (:func:`compare`), does not hold when measurably
    higher; overlapping spreads or one seed on either side are inconclusive."""
    ours, base = finite(ours), finite(base)
    if not ours or not base:
        return UNTESTABLE, 'a run is missing or failed'
    where = compare(ours, base)
    why = f'{metric} {_ms(ours)} vs {_ms(base)}'
    if where == SINGLE:
        side = 'lower' if statistics.fmean(ours) < statistics.fmean(base) else 'not lower'
        return UNSURE, f'{why}; mean {side}, but one seed on a side has no spread to judge by'
    if where == WITHIN:
        return UNSURE, f'{why}; mean ± std intervals overlap'
    return (HOLDS if where == LOWER else FAILS), f'{why}; intervals disjoint'


def claim_personal(per_seed: list) -> tuple[str, str]:
    """Claim 4 ('most clients gain') from per_seed = [(share, lo, hi)], one bootstrap CI over
    clients per training seed. Holds when every seed's CI lies above 50% and does not hold when
    every seed's CI lies at or below it, with two or more seeds; otherwise (or with one seed,
    whose CI covers the clients but not the training noise) inconclusive."""
    per_seed = [s for s in per_seed if np.isfinite(s[0])]
    if not per_seed:
        return UNTESTABLE, 'no client was evaluated'
    why = ('share of clients that improve (95% CI) per seed: ' +
           ', '.join(f'{100 * s:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]'
                     for s, lo, hi in per_seed) + f' (n = {len(per_seed)})')
    if len(per_seed) < 2:
        return UNSURE, why + '; one training seed: the CI covers clients, not seeds'
    if all(lo > 0.5 for _, lo, _ in per_seed):
        return HOLDS, why
    if all(hi <= 0.5 for _, _, hi in per_seed):
        return FAILS, why
    return UNSURE, why + '; a CI reaches across 50%'


def claim_rank(ranks: list, ppl: list) -> tuple[str, str]:
    """Claim 5, diminishing returns in the LoRA rank, from ppl[i] = the per-seed final PPLs at
    ranks[i]. Needs 3 ranks, and 2 or more seeds at every rank (else inconclusive).

    The plateau rank r_p is the smallest rank that no higher rank beats measurably
    (:func:`compare`). Holds when r_min < r_p < r_max and r_p beats r_min measurably (a
    measurable gain, then none); does not hold when r_p = r_max (the gain goes on to the
    largest rank); inconclusive when no rank beats r_min measurably.
    """
    pts = [(r, finite(v)) for r, v in sorted(zip(ranks, ppl), key=lambda t: t[0])]
    pts = [(r, v) for r, v in pts if v]
    if len(pts) < 3:
        return UNTESTABLE, f'{len(pts)} ranks measured (the rule needs 3 or more)'
    shown = 'PPL ' + ', '.join(f'r{r}: {_ms(v)}' for r, v in pts)
    single = [r for r, v in pts if len(v) < 2]
    if single:
        best = min(pts, key=lambda t: statistics.fmean(t[1]))[0]
        return UNSURE, (f'{shown}; one seed at r={single}: no seed spread, so no gain or '
                        f'loss is measurable (lowest mean at r={best})')
    p = next(i for i in range(len(pts))
             if not any(compare(v, pts[i][1]) == LOWER for _, v in pts[i + 1:]))
    rp, vp = pts[p]
    above = [(r, compare(v, vp)) for r, v in pts[p + 1:]]
    words = {WITHIN: 'within seed spread: no measurable gain', HIGHER: 'measurably worse'}
    rest = '; '.join(f'r={r} vs r={rp}: {words[w]}' for r, w in above)
    if p == 0:
        return UNSURE, f'{shown}; no rank measurably below r={pts[0][0]}'
    if p == len(pts) - 1:
        return FAILS, f'{shown}; measurable gain up to the largest rank r={rp}: no plateau'
    return HOLDS, f'{shown}; measurable gain r={pts[0][0]} -> r={rp}; {rest}'


def claim_epochs(epochs: list, ppl: list, drift: list) -> tuple[str, str]:
    """Claim 6, local epochs E vs client drift, from per-seed final PPLs ppl[i] and per-seed
    round-mean drifts drift[i] at epochs[i]. Needs 3 values of E with both, and 2 or more seeds
    at each (else inconclusive). With :func:`compare`:
    holds when the drift at the largest E is measurably above the smallest E's while the last
    step of E gains no measurable PPL; does not hold when the drift is measurably lower at the
    largest E, or the last step still gains measurably and by at least the first step's mean
    gain; inconclusive otherwise."""
    pts = [(e, finite(p), finite(d))
           for e, p, d in sorted(zip(epochs, ppl, drift), key=lambda t: t[0])]
    pts = [t for t in pts if t[1] and t[2]]
    if len(pts) < 3:
        return UNTESTABLE, f'{len(pts)} values of E with PPL and drift (the rule needs 3)'
    e, p, d = map(list, zip(*pts))
    shown = (f'E {e}: PPL [{", ".join(_ms(v) for v in p)}], drift '
             f'[{", ".join(_ms(v) for v in d)}]')
    single = [x for x, a, b in pts if min(len(a), len(b)) < 2]
    if single:
        rises = statistics.fmean(d[-1]) > statistics.fmean(d[0])
        return UNSURE, (f'{shown}; one seed at E={single}: no seed spread (mean drift '
                        f'{"rises" if rises else "does not rise"})')
    drift_at = compare(d[-1], d[0])  # HIGHER: the drift rose
    last = compare(p[-1], p[-2])  # LOWER: the last step of E still gains
    mean = [statistics.fmean(v) for v in p]
    gains = [a - b for a, b in zip(mean, mean[1:])]
    why = (f'{shown}; drift E={e[-1]} vs E={e[0]}: {drift_at}; PPL E={e[-1]} vs E={e[-2]}: '
           f'{last}')
    if drift_at == LOWER or (last == LOWER and gains[-1] >= gains[0]):
        return FAILS, why
    if drift_at == HIGHER and last != LOWER:
        return HOLDS, why
    return UNSURE, why
