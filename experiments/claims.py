"""The claim rules of the reproduction report: one pure function per FedGen-Edge claim.

Each ``claim_*`` maps measured numbers to (verdict, why). Verdicts: 'holds', 'does not hold',
'inconclusive' (the direction agrees but the gap is inside the seed spread / the CI covers 50%)
and 'not testable here'. experiments/report.py applies them to a reproduce run.
"""
import statistics

import numpy as np

HOLDS, FAILS, UNSURE, UNTESTABLE = 'holds', 'does not hold', 'inconclusive', 'not testable here'


def std(v: list) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values."""
    return statistics.stdev(v) if len(v) > 1 else 0.0


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
    """Claim 1 holds when the whole-model uplink reduction exceeds 99%."""
    if not np.isfinite(whole):
        return UNTESTABLE, 'no uplink measured'
    verdict = HOLDS if whole > 0.99 else FAILS
    return verdict, (f'reduction {100 * whole:.2f}% whole model (rule: > 99%); '
                     f'{100 * blocks:.2f}% against the transformer blocks alone')


def claim_lower(ours: list, base: list, metric: str) -> tuple[str, str]:
    """Claims 2/3: FedGen-Edge's final ``metric`` is lower than full FedAvg's. Holds when the
    mean is lower by more than the larger seed std (with one seed: when it is lower); the
    same direction inside the spread is inconclusive."""
    ours = [v for v in ours if v is not None and np.isfinite(v)]
    base = [v for v in base if v is not None and np.isfinite(v)]
    if not ours or not base:
        return UNTESTABLE, 'a run is missing or failed'
    mo, mb = statistics.fmean(ours), statistics.fmean(base)
    spread = max(std(ours), std(base))
    why = (f'{metric} {mo:.4g} vs {mb:.4g} (mean of {len(ours)}/{len(base)} seeds, '
           f'larger std {spread:.3g})')
    if mo >= mb:
        return FAILS, why
    return (HOLDS if mb - mo > spread else UNSURE), why


def claim_personal(share: float, lo: float, hi: float) -> tuple[str, str]:
    """Claim 4 ('most clients gain'): holds when the CI's lower end is above 50%; does not hold
    when the share is at most 50%; inconclusive otherwise."""
    if not np.isfinite(share):
        return UNTESTABLE, 'no client was evaluated'
    why = f'{100 * share:.1f}% of clients improve, 95% CI [{100 * lo:.1f}, {100 * hi:.1f}]%'
    return (HOLDS if lo > 0.5 else FAILS if share <= 0.5 else UNSURE), why


def claim_rank(ranks: list, ppl: list) -> tuple[str, str]:
    """Claim 5: with gains g_i = ppl(r_i) - ppl(r_{i+1}) between consecutive ranks, it holds when
    the total gain is positive and the mean gain of the later half of the steps is smaller than
    that of the earlier half. Needs at least 3 ranks."""
    pts = [(r, p) for r, p in sorted(zip(ranks, ppl)) if p is not None and np.isfinite(p)]
    if len(pts) < 3:
        return UNTESTABLE, f'{len(pts)} ranks measured (the rule needs 3 or more)'
    g = [a[1] - b[1] for a, b in zip(pts, pts[1:])]
    h = len(g) // 2
    early, late = statistics.fmean(g[:max(h, 1)]), statistics.fmean(g[h:])
    why = (f'PPL {", ".join(f"r{r}: {p:.4g}" for r, p in pts)}; mean gain per step '
           f'{early:.3g} (lower ranks) vs {late:.3g} (higher)')
    return (HOLDS if sum(g) > 0 and late < early else FAILS), why


def claim_epochs(epochs: list, ppl: list, drift: list) -> tuple[str, str]:
    """Claim 6: holds when drift grows with E (drift at the largest E above the smallest) while
    the PPL does not keep improving at the same pace (best E below the largest, or the last
    step's gain below the first's). Needs at least 3 values of E with drift measured."""
    pts = [(e, p, d) for e, p, d in sorted(zip(epochs, ppl, drift))
           if p is not None and d is not None and np.isfinite(p) and np.isfinite(d)]
    if len(pts) < 3:
        return UNTESTABLE, f'{len(pts)} values of E with PPL and drift (the rule needs 3)'
    e, p, d = map(list, zip(*pts))
    rises = d[-1] > d[0]
    gains = [a - b for a, b in zip(p, p[1:])]
    diminishing = int(np.argmin(p)) < len(p) - 1 or gains[-1] < gains[0]
    why = (f'E {e}: PPL {[round(x, 4) for x in p]}, drift {[round(x, 4) for x in d]}; drift '
           f'{"rises" if rises else "does not rise"}, PPL gains '
           f'{"diminish" if diminishing else "do not diminish"}')
    return (HOLDS if rises and diminishing else FAILS), why
