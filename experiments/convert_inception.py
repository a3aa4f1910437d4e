"""Convert the public pytorch-fid Inception weights into fedgen's InceptionV3 `.npz`.

Input: the torch state_dict `pt_inception-2015-12-05-6726825d.pth` released with pytorch-fid
(the FID Inception port of the TF 2015-12-05 graph). Output: the `.npz` read by
`fedgen.metrics.inception.load_params` (format in that module's docstring); pass its path as
`metrics.inception_path` to get real FID.

torch is needed only here, only to unpickle the file, and is not a fedgen runtime dependency
(it is the `interop` extra, which also runs the torch parity test in tests/test_inception.py):

    pip install -e .[interop]   # torch; CPU-only wheels: https://download.pytorch.org/whl/cpu
    python3 -m experiments.convert_inception \\
        --torch_weights pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

Mapping (flax names follow torchvision, so it is a rename + transpose):
    <module>.conv.weight [O, I, kh, kw] -> params/<module>/conv/kernel [kh, kw, I, O]
    <module>.bn.weight / .bn.bias       -> params/<module>/bn/scale / bias
    <module>.bn.running_mean / _var     -> batch_stats/<module>/bn/mean / var
The classifier head (fc.*), any AuxLogits.* and num_batches_tracked are not used for pool3.
"""
import argparse
from typing import Dict, Mapping

import numpy as np

from fedgen.metrics import inception

_IGNORED_PREFIXES = ('fc.', 'AuxLogits.')
_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def torch_key(flax_key: str) -> str:
    """'params/Mixed_5b/branch1x1/conv/kernel' -> 'Mixed_5b.branch1x1.conv.weight'."""
    collection, *modules, leaf = flax_key.split('/')
    return '.'.join(modules + [_LEAF_TO_TORCH[(collection, leaf)]])


def convert(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Torch state_dict (as numpy arrays) -> flat {flax '/'-key: float32 array} for `.npz`.

    Raises ValueError when a needed tensor is missing, has the wrong shape, or the state_dict has
    tensors that belong to no known module (i.e. it is not an InceptionV3 checkpoint).
    """
    out, used = {}, set()
    for key, shape in inception.expected_shapes().items():
        name = torch_key(key)
        if name not in state_dict:
            raise ValueError(f'torch_weights: missing tensor {name!r} (for {key!r})')
        value = np.asarray(state_dict[name], np.float32)
        if key.endswith('conv/kernel'):
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != shape:
            raise ValueError(f'torch_weights: {name!r} has shape {value.shape}, want {shape}')
        out[key] = value
        used.add(name)
    unknown = sorted(k for k in state_dict if k not in used and not k.startswith(_IGNORED_PREFIXES)
                     and not k.endswith('num_batches_tracked'))
    if unknown:
        raise ValueError(f'torch_weights: {len(unknown)} unexpected tensors (first {unknown[0]!r})')
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--torch_weights', required=True, help='pytorch-fid .pth state_dict')
    parser.add_argument('--out', required=True, help='output .npz path')
    args = parser.parse_args(argv)

    import torch  # lazily: only this script needs it

    state = torch.load(args.torch_weights, map_location='cpu')
    flat = convert({k: v.detach().cpu().numpy() for k, v in state.items()})
    with open(args.out, 'wb') as f:  # a file object: np.savez would append '.npz' to a path
        np.savez(f, **flat)
    # Round-trip validation of what was written.
    inception.load_params(args.out, field='metrics.inception_path')
    print(f'wrote {len(flat)} arrays to {args.out}')


if __name__ == '__main__':
    main()
