"""Optimizers named in configs, built with optax."""
import optax

_BUILDERS = {
    'sgd': lambda lr: optax.sgd(lr),
    'momentum': lambda lr: optax.sgd(lr, momentum=0.9),
    'adam': lambda lr: optax.adam(lr),
    # FedAdam's server optimizer (Reddi et al. 2021) uses a large epsilon (tau = 1e-3).
    'fedadam': lambda lr: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3),
    'adamw': lambda lr: optax.adamw(lr, weight_decay=0.01),
}


def build(name: str, lr: float, name_field: str, lr_field: str) -> optax.GradientTransformation:
    """Optimizer ``name`` at learning rate ``lr``; the fields name the config entries in errors."""
    if name not in _BUILDERS:
        raise ValueError(f'{name_field} must be one of {sorted(_BUILDERS)}, got {name!r}')
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f'{lr_field} must be a number > 0, got {lr!r}')
    return _BUILDERS[name](lr)
