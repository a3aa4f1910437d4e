"""Optimizers named in configs, built with optax; the adaptive server optimizers of FedOpt.

Client and pre-training optimizers are plain optax ones (`build(name, lr, ...)`). The server
optimizers FedAdagrad, FedYogi and FedAdam are Algorithm 2 of Reddi et al., "Adaptive Federated
Optimization" (ICLR 2021), exactly. With Delta_t the aggregated client update of round t:

    m_t = b1 m_{t-1} + (1 - b1) Delta_t                          (all three; m_{-1} = 0)
    v_t = v_{t-1} + Delta_t^2                                    FedAdagrad
    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2) FedYogi
    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                        FedAdam
    x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)

with v_{-1} = tau^2 (the paper requires v_{-1} >= tau^2; we take the bound), the adaptivity
tau added OUTSIDE the square root, and no bias correction of m or v. This differs on purpose
from `optax.adam`/`optax.yogi`, from FedJAX (whose server `adam` is `optax.adam`) and from TFF's
`build_adam`/`build_yogi` (TFF's Adam and Yogi bias-correct; TFF's Yogi puts its epsilon into a
separate preconditioner initial value): early rounds of the paper's methods take steps of
about lr * (1 - b1) Delta / (sqrt(v) + tau), not lr * sign(Delta).

Sign convention: the engine hands a server optimizer the pseudo-gradient g = -Delta and adds
the returned updates to the global weights (`optax.apply_updates`); so the transformation below
forms Delta = -g and returns +lr * m / (sqrt(v) + tau). FedAvg is `sgd` at lr 1.
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

_BUILDERS = {
    'sgd': lambda lr: optax.sgd(lr),
    'momentum': lambda lr: optax.sgd(lr, momentum=0.9),
    'adam': lambda lr: optax.adam(lr),
    'adamw': lambda lr: optax.adamw(lr, weight_decay=0.01),
}
FEDOPT = ('fedadagrad', 'fedyogi', 'fedadam')
SERVER_NAMES = ('sgd', 'momentum', 'adam') + FEDOPT


@dataclasses.dataclass(frozen=True)
class ServerOptSpec:
    """Server optimizer hyper-parameters.

    name: one of SERVER_NAMES. lr: server learning rate eta (> 0). b1: first-moment decay in
    [0, 1) (FedOpt's beta_1; the momentum of 'momentum', i.e. FedAvgM; Adam's b1). b2:
    second-moment decay in [0, 1) (FedYogi, FedAdam, Adam; unused otherwise). tau: adaptivity
    (> 0) of the FedOpt methods, also Adam's eps. The defaults b1 = 0.9, b2 = 0.99 are the
    paper's; tau = 1e-3 is one point of its tuning grid (1e-5 .. 1).
    """
    name: str = 'sgd'
    lr: float = 1.0
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3


class FedOptState(NamedTuple):
    """m: first moment, v: second moment (pytrees like the params; v starts at tau^2)."""
    m: optax.Updates
    v: optax.Updates


def _second_moment(name: str, v, d2, b2: float):
    if name == 'fedadagrad':
        return v + d2
    if name == 'fedyogi':
        return v - (1.0 - b2) * d2 * jnp.sign(v - d2)
    return b2 * v + (1.0 - b2) * d2


def fedopt(name: str, lr: float, b1: float, b2: float, tau: float) -> optax.GradientTransformation:
    """FedAdagrad / FedYogi / FedAdam (module docstring) as an optax transformation.

    update(g, state) takes the pseudo-gradient g = -Delta (a pytree of arrays) and returns the
    updates lr * m_t / (sqrt(v_t) + tau) to ADD to the weights. Arguments are validated by
    `build_server`; this function trusts them.
    """
    if name not in FEDOPT:
        raise ValueError(f'name must be one of {FEDOPT} here, got {name!r}')

    def init(params):
        return FedOptState(m=jax.tree.map(jnp.zeros_like, params),
                           v=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params))

    def update(grads, state, params=None):
        del params
        delta = jax.tree.map(jnp.negative, grads)
        m = jax.tree.map(lambda m, d: b1 * m + (1.0 - b1) * d, state.m, delta)
        v = jax.tree.map(lambda v, d: _second_moment(name, v, jnp.square(d), b2), state.v, delta)
        updates = jax.tree.map(lambda m, v: lr * m / (jnp.sqrt(v) + tau), m, v)
        return updates, FedOptState(m, v)

    return optax.GradientTransformation(init, update)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def build_server(spec: ServerOptSpec, field: str = 'server') -> optax.GradientTransformation:
    """The server optimizer of `spec`; errors name the config fields `<field>_opt`, `_lr`, ...

    'sgd': x + lr * Delta (FedAvg at lr 1). 'momentum': FedAvgM, heavy-ball SGD with momentum
    b1. 'adam': optax.adam(lr, b1, b2, eps=tau) (bias-corrected; NOT FedAdam). 'fedadagrad',
    'fedyogi', 'fedadam': Reddi et al. 2021 exactly (module docstring).
    """
    if spec.name not in SERVER_NAMES:
        raise ValueError(f'{field}_opt must be one of {SERVER_NAMES}, got {spec.name!r}')
    if not (_number(spec.lr) and spec.lr > 0):
        raise ValueError(f'{field}_lr must be a number > 0, got {spec.lr!r}')
    for name, value in (('b1', spec.b1), ('b2', spec.b2)):
        if not (_number(value) and 0 <= value < 1):
            raise ValueError(f'{field}_{name} must be a number in [0, 1), got {value!r}')
    if not (_number(spec.tau) and spec.tau > 0):
        raise ValueError(f'{field}_tau must be a number > 0, got {spec.tau!r}')
    lr, b1, b2, tau = float(spec.lr), float(spec.b1), float(spec.b2), float(spec.tau)
    if spec.name in FEDOPT:
        return fedopt(spec.name, lr, b1, b2, tau)
    if spec.name == 'sgd':
        return optax.sgd(lr)
    if spec.name == 'momentum':
        return optax.sgd(lr, momentum=b1)
    return optax.adam(lr, b1=b1, b2=b2, eps=tau)


def build(name: str, lr: float, name_field: str, lr_field: str) -> optax.GradientTransformation:
    """Optimizer ``name`` at learning rate ``lr``; the fields name the config entries in errors.

    Client names: sgd, momentum (0.9), adam, adamw (weight decay 0.01). The FedOpt names build
    the paper's server optimizers with ServerOptSpec's default b1, b2 and tau.
    """
    names = sorted(set(_BUILDERS) | set(FEDOPT))
    if name not in names:
        raise ValueError(f'{name_field} must be one of {names}, got {name!r}')
    if not (_number(lr) and lr > 0):
        raise ValueError(f'{lr_field} must be a number > 0, got {lr!r}')
    if name in FEDOPT:
        d = ServerOptSpec()
        return fedopt(name, float(lr), d.b1, d.b2, d.tau)
    return _BUILDERS[name](lr)
