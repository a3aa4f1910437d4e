"""Privacy accounting for user-level DP-FedAvg with PyPI ``dp-accounting`` (RDP or PLD).

One round is one sampled Gaussian mechanism on the clipped sum (sensitivity S, noise z S):
  'poisson': each of N clients joins with probability q; add-or-remove-one neighbouring users;
             event PoissonSampledDpEvent(q, GaussianDpEvent(z)).
  'fixed':   m = q N clients drawn without replacement; replace-one neighbouring users (N is
             public), under which the sum's L2 sensitivity is 2 S, so the Gaussian has multiplier
             z / 2: SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2)) (Wang, Balle,
             Kasiviswanathan 2019). dp-accounting implements this event in RDP only.
T rounds are the self-composition of that event; (epsilon, delta) is read from the accountant.

delta: the default is N^-1.1 (``default_delta``), and ``check`` refuses delta >= 1/N. A mechanism
that publishes the whole data of one user drawn at random is (0, 1/N)-DP, so a delta of 1/N or
more certifies nothing; N^-1.1 stays below 1/N by the factor N^0.1 at every N >= 2.
With adaptive clipping, z is the multiplier of the composed (sum, count) mechanism (see ``dp``).
A server optimizer other than plain SGD, and every later use of the model, is post-processing of
the noisy aggregates: the guarantee covers them unchanged.
"""
import math

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ('rdp', 'pld')
SAMPLINGS = ('poisson', 'fixed')
MAX_NOISE_MULTIPLIER = 1e3  # calibration gives up beyond this z: the model would learn nothing


def default_delta(num_clients: int, *, section: str = '') -> float:
    """delta = N^-1.1 for a population of N = num_clients >= 2 users.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if not num_clients >= 2:
        raise ValueError(f'DP needs {section}num_clients >= 2 (delta = N^-1.1 < 1/N), '
                         f'got {num_clients}')
    return float(num_clients)**-1.1


def check(delta: float,
          accountant: str,
          sampling: str,
          q: float,
          num_clients: int = 0,
          *,
          section: str = '') -> None:
    """One-line ValueErrors for the accounting fields (dp.delta, dp.accountant, dp.sampling,
    num_clients), before any compute.

    num_clients: N, the population; 0 means unknown (then only 0 < delta < 1 is checked). With
    N >= 1 the allowed range is 0 < delta < 1/N.
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if not 0 < delta < 1:
        raise ValueError(f'{section}dp.delta must be in (0, 1), got {delta}')
    if num_clients >= 1 and not delta < 1.0 / num_clients:
        raise ValueError(
            f'{section}dp.delta must be in (0, 1/N) = (0, {1.0 / num_clients:.4g}) '
            f'for N = {section}num_clients = {num_clients}, got {delta:.4g}: '
            f'publishing one random user\'s data is already (0, 1/N)-DP; the default is N^-1.1 = '
            f'{float(num_clients)**-1.1:.4g}')
    if accountant not in ACCOUNTANTS:
        raise ValueError(f'{section}dp.accountant must be one of {ACCOUNTANTS}, '
                         f'got {accountant!r}')
    if sampling not in SAMPLINGS:
        raise ValueError(f'{section}dp.sampling must be one of {SAMPLINGS}, got {sampling!r}')
    if not 0 < q <= 1:
        raise ValueError(f'client sampling rate q must be in (0, 1], got {q}')
    if sampling == 'fixed':
        if accountant != 'rdp':
            raise ValueError(
                f"{section}dp.accountant='pld' has no accounting for "
                f"{section}dp.sampling='fixed' (sampling without replacement) in dp-accounting; "
                f"use 'rdp'")
        m = q * num_clients
        if num_clients < 1 or abs(m - round(m)) > 1e-9 or round(m) < 1:
            raise ValueError(f"{section}dp.sampling='fixed' needs q * {section}num_clients to be a "
                             f"whole count >= 1, got q = {q}, N = {num_clients}")
    elif num_clients and q * num_clients < 1:
        raise ValueError(f'Poisson sampling needs an expected count q N >= 1, got '
                         f'{q * num_clients:g}')


def round_event(q: float, z: float, sampling: str = 'poisson', num_clients: int = 0):
    """The DpEvent of one round."""
    if sampling == 'poisson':
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    m = int(round(q * num_clients))
    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, m,
                                                          dp_accounting.GaussianDpEvent(z / 2))


def make_accountant(accountant: str, sampling: str):
    """A fresh dp-accounting accountant with the neighbouring relation of the sampling scheme."""
    rel = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
           if sampling == 'poisson' else dp_accounting.NeighboringRelation.REPLACE_ONE)
    if accountant == 'rdp':
        return rdp.RdpAccountant(neighboring_relation=rel)
    return pld.PLDAccountant(neighboring_relation=rel)


def epsilon(q: float,
            z: float,
            steps: int,
            delta: float,
            accountant: str = 'rdp',
            sampling: str = 'poisson',
            num_clients: int = 0,
            *,
            section: str = '') -> float:
    """epsilon spent after ``steps`` rounds at ``delta`` (inf when z = 0 and steps > 0).

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    check(delta, accountant, sampling, q, num_clients, section=section)
    if not z >= 0:
        raise ValueError(f'{section}dp.noise_multiplier must be >= 0, got {z}')
    if steps <= 0:
        return 0.0
    if z == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(round_event(q, z, sampling, num_clients), steps)
    return float(make_accountant(accountant, sampling).compose(event).get_epsilon(delta))


def calibrate_noise(target_epsilon: float,
                    q: float,
                    steps: int,
                    delta: float,
                    accountant: str = 'rdp',
                    sampling: str = 'poisson',
                    num_clients: int = 0,
                    tol: float = 1e-3,
                    *,
                    section: str = '') -> float:
    """Smallest z (within tol, rounded up) whose epsilon after ``steps`` rounds is <= target.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    check(delta, accountant, sampling, q, num_clients, section=section)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f'{section}dp.target_epsilon must be finite and > 0, '
                         f'got {target_epsilon}')
    if steps < 1:
        raise ValueError(f'calibrating {section}dp.target_epsilon needs >= 1 round, got {steps}')

    def eps(z):
        return epsilon(q, z, steps, delta, accountant, sampling, num_clients)

    if eps(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(f'{section}dp.target_epsilon={target_epsilon:g} is unreachable in '
                         f'{steps} rounds at q={q:g}, delta={delta:g} ({accountant}): even z='
                         f'{MAX_NOISE_MULTIPLIER:g} spends more')
    # Bracket by doubling/halving from z = 1 (epsilon is decreasing in z), then let
    # dp-accounting's calibration (Brent's method) find the root inside the bracket.
    lo, hi = 1.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, min(2 * hi, MAX_NOISE_MULTIPLIER)
    while lo == hi or eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < tol:
            return float(hi)
    z = dp_accounting.calibrate_dp_mechanism(lambda: make_accountant(accountant, sampling),
                                             lambda z: dp_accounting.SelfComposedDpEvent(
                                                 round_event(q, z, sampling, num_clients), steps),
                                             target_epsilon,
                                             delta,
                                             dp_accounting.ExplicitBracketInterval(lo, hi),
                                             tol=tol)
    while eps(z) > target_epsilon:  # calibration guarantees this already; keep it true
        z += tol
    return float(z)


class RoundAccountant:
    """Running epsilon of a run: ``epsilon_after(t)`` composes only the rounds not yet counted.

    Works for resumed runs (the first call composes all t rounds at once).
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """

    def __init__(self,
                 q: float,
                 z: float,
                 delta: float,
                 accountant: str = 'rdp',
                 sampling: str = 'poisson',
                 num_clients: int = 0,
                 *,
                 section: str = ''):
        check(delta, accountant, sampling, q, num_clients, section=section)
        self._event = round_event(q, z, sampling, num_clients) if z > 0 else None
        self._acc = make_accountant(accountant, sampling)
        self._delta = delta
        self._rounds = 0

    def epsilon_after(self, rounds: int) -> float:
        if rounds < self._rounds:
            raise ValueError(f'rounds went backwards: {rounds} < {self._rounds}')
        if rounds == 0:
            return 0.0
        if self._event is None:
            return math.inf
        if rounds > self._rounds:
            self._acc.compose(self._event, rounds - self._rounds)
            self._rounds = rounds
        return float(self._acc.get_epsilon(self._delta))
