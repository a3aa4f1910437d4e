"""Tiny LoRA client trees shared by the aggregation tests (and their multi-device child)."""
import jax
import numpy as np

ALPHA, R = 4.0, 3
SHAPES = {'q': ((10, ), 7), 'conv': ((2, 2, 3), 6)}  # module: (A kernel axes, out)


def clients(c, seed, r=R):
    """Random adapters of ``c`` clients: {module: {a: [c, *A axes, r], b: [c, r, out]}}."""
    rng = np.random.default_rng(seed)
    tree = {}
    for n, (ax, out) in SHAPES.items():
        tree[n] = {
            'a': rng.normal(size=(c, ) + ax + (r, )).astype(np.float32),
            'b': rng.normal(size=(c, r, out)).astype(np.float32)
        }
    return tree


def global_tree(seed, r=R):
    """One random adapter tree (no client axis)."""
    return jax.tree.map(lambda x: x[0], clients(1, seed, r))


def factors(ad, n, mask=None):
    """Module ``n``'s (A [c, in, r], B [c, r, out]) in float64, rank-masked when given."""
    a = np.asarray(ad[n]['a'], np.float64)
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    b = np.asarray(ad[n]['b'], np.float64)
    if mask is not None:
        a, b = a * mask[:, None, :], b * mask[:, :, None]
    return a, b


def ref_error(ad, w, mask=None):
    """(per-module, total) aggregation error of adapters ``ad`` with weights ``w`` [c], dense
    float64 (rank-masked means when ``mask`` [c, r] is given)."""
    p = w / w.sum()
    per, nums, dens = {}, 0.0, 0.0
    for n in sorted(SHAPES):
        a, b = factors(ad, n, mask)
        prod = np.einsum('k,kir,kro->io', p, a, b)
        if mask is None:
            abar, bbar = np.einsum('k,kir->ir', p, a), np.einsum('k,kro->ro', p, b)
        else:
            q = (w[:, None] * mask) / np.maximum((w[:, None] * mask).sum(0), 1e-30)
            abar, bbar = np.einsum('kr,kir->ir', q, a), np.einsum('kr,kro->ro', q, b)
        num, den = np.linalg.norm(prod - abar @ bbar), np.linalg.norm(prod)
        per[n], nums, dens = num / den, nums + num**2, dens + den**2
    return per, np.sqrt(nums / dens)
