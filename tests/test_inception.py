"""Tests for fedgen.metrics.inception (random weights) and experiments/convert_inception.py."""
import numpy as np
import pytest
from flax import traverse_util

try:  # the torch parity test needs the `interop` extra
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

from experiments import convert_inception
from fedgen.metrics import inception


def _random_flat(seed=0):
    """Random weights with He-scaled kernels and identity BatchNorm, so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in inception.expected_shapes().items():
        if key.endswith('kernel'):
            fan_in = int(np.prod(shape[:-1]))
            flat[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith(('scale', 'var')):
            flat[key] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        else:
            flat[key] = (0.1 * rng.normal(size=shape)).astype(np.float32)
    return flat


@pytest.fixture(scope='module')
def variables():
    return traverse_util.unflatten_dict(_random_flat(), sep='/')


def test_architecture_matches_published_inception_v3_size():
    # Keras InceptionV3(include_top=False) (same layer layout, BN without gamma): 21,802,784
    # parameters of which 34,432 are non-trainable BN mean/var, i.e. 17,216 BN channels.
    shapes = inception.expected_shapes()
    conv = [s for k, s in shapes.items() if k.endswith('conv/kernel')]
    bn_channels = sum(s[0] for k, s in shapes.items() if k.endswith('bn/scale'))
    assert len(conv) == 94
    assert 2 * bn_channels == 34_432
    assert sum(int(np.prod(s)) for s in conv) + 3 * bn_channels == 21_802_784
    assert shapes['params/Conv2d_1a_3x3/conv/kernel'] == (3, 3, 3, 32)
    assert shapes['params/Mixed_7c/branch_pool/conv/kernel'] == (1, 1, 2048, 192)


def test_features_shape_and_input_conventions(variables):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    feats = np.asarray(inception.features(variables, images))
    assert feats.shape == (2, inception.FEATURE_DIM)
    assert np.all(np.isfinite(feats))
    assert np.all(feats >= 0)  # global average of ReLU outputs
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # different images, different features
    # uint8 [0, 255] and the float [-1, 1] model convention give the same features.
    as_float = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(inception.features(variables, as_float)),
                               feats,
                               rtol=1e-4,
                               atol=1e-5)


def test_preprocess_is_half_pixel_bilinear():
    # A horizontal two-pixel ramp [a, b]: torch's bilinear with align_corners=False samples the
    # source at s = (i + 0.5) * 2 / 299 - 0.5, clamped to [0, 1].
    a, b = -0.5, 0.75
    img = np.tile(np.array([a, b], np.float32)[None, :, None], (2, 1, 3))[None]  # [1, 2, 2, 3]
    out = np.asarray(inception._preprocess(img))
    assert out.shape == (1, 299, 299, 3)
    s = np.clip((np.arange(299) + 0.5) * 2 / 299 - 0.5, 0.0, 1.0)
    np.testing.assert_allclose(out[0, 17, :, 1], a + (b - a) * s, atol=1e-6)
    u8 = np.array([[[[0, 255, 128]]]], np.uint8)
    np.testing.assert_allclose(np.asarray(inception._preprocess(u8))[0, 5, 7],
                               [-1.0, 1.0, 128 / 127.5 - 1],
                               atol=1e-6)


def test_npz_roundtrip(tmp_path, variables):
    path = str(tmp_path / 'inception.npz')
    inception.save_params(variables, path)
    loaded = traverse_util.flatten_dict(inception.load_params(path), sep='/')
    original = traverse_util.flatten_dict(variables, sep='/')
    assert set(loaded) == set(original) == set(inception.expected_shapes())
    for key, value in original.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_load_rejects_bad_files(tmp_path):
    flat = _random_flat(seed=2)
    with pytest.raises(ValueError, match=r'^path: no InceptionV3 \.npz weights file at '):
        inception.load_params(str(tmp_path / 'absent.npz'))
    with pytest.raises(ValueError, match=r'^metrics\.inception_path: no InceptionV3 '):
        inception.load_params(str(tmp_path / 'absent.npz'), field='metrics.inception_path')

    missing = dict(flat)
    del missing['batch_stats/Mixed_6c/branch7x7dbl_4/bn/var']
    np.savez(tmp_path / 'missing.npz', **missing)
    with pytest.raises(ValueError, match='^path: .*missing.*branch7x7dbl_4'):
        inception.load_params(str(tmp_path / 'missing.npz'))

    wrong = dict(flat)
    wrong['params/Mixed_5b/branch5x5_2/conv/kernel'] = np.zeros((3, 3, 48, 64), np.float32)
    np.savez(tmp_path / 'wrong.npz', **wrong)
    with pytest.raises(ValueError, match='^path: .*wrong shape.*branch5x5_2'):
        inception.load_params(str(tmp_path / 'wrong.npz'))


def _to_torch_layout(flat):
    """Independent inverse of the converter: the pytorch-fid state_dict naming and OIHW kernels."""
    leaf = {
        'kernel': 'weight',
        'scale': 'weight',
        'bias': 'bias',
        'mean': 'running_mean',
        'var': 'running_var'
    }
    state = {}
    for key, value in flat.items():
        parts = key.split('/')[1:]
        name = '.'.join(parts[:-1] + [leaf[parts[-1]]])
        state[name] = value.transpose(3, 2, 0, 1) if parts[-1] == 'kernel' else value
        if parts[-1] == 'mean':
            state[name.replace('running_mean', 'num_batches_tracked')] = np.array(0)
    state['fc.weight'] = np.zeros((1008, 2048), np.float32)
    state['fc.bias'] = np.zeros((1008, ), np.float32)
    return state


def test_converter_maps_pytorch_fid_state_dict():
    flat = _random_flat(seed=3)
    state = _to_torch_layout(flat)
    # Names as they appear in the pytorch-fid checkpoint.
    assert state['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
    assert state['Mixed_7c.branch3x3dbl_3b.bn.running_var'].shape == (384, )
    converted = convert_inception.convert(state)
    assert set(converted) == set(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(converted[key], value)

    with pytest.raises(ValueError, match='missing'):
        convert_inception.convert({k: v for k, v in state.items() if 'Mixed_6e' not in k})
    with pytest.raises(ValueError, match='unexpected'):
        convert_inception.convert({**state, 'Mixed_8a.conv.weight': np.zeros(1)})
    swapped = dict(state)  # a kernel left in HWIO order is caught by its shape
    swapped['Mixed_5b.branch5x5_2.conv.weight'] = flat['params/Mixed_5b/branch5x5_2/conv/kernel']
    with pytest.raises(ValueError, match='shape'):
        convert_inception.convert(swapped)


# --- Parity with an independent torch implementation of the FID Inception network ---------------
#
# pytorch-fid's `FIDInceptionA/C/E_1/E_2` subclass torchvision's Inception blocks, and the
# torchvision wheels on PyPI are CUDA builds that do not load against the CPU torch wheel, so the
# reference below restates the pytorch-fid network (pytorch_fid/inception.py, FID weights branch)
# in torch.nn.functional: torchvision's Inception-v3 layout with
#   * FIDInceptionA / FIDInceptionC / FIDInceptionE_1: 3x3 avg pools with count_include_pad=False;
#   * FIDInceptionE_2 (Mixed_7c): a 3x3 stride-1 max pool in the pool branch;
#   * BasicConv2d = conv (no bias) -> BatchNorm(eps=0.001, running stats) -> ReLU;
#   * input [N, 3, H, W] in [0, 1] -> bilinear resize to 299 (align_corners=False) -> 2x - 1;
#   * output: adaptive average pool of Mixed_7c -> [N, 2048].
# The weights are drawn in the torch state_dict layout while the reference runs, so the
# architecture is written down only here; the flax side gets them through the converter.


class _TorchFIDInception:
    """Functional torch FID-InceptionV3; creates its state_dict lazily (He-scaled kernels)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.state = {}

    def _new(self, shape, kind):
        if kind == 'kernel':
            fan_in = int(np.prod(shape[1:]))
            value = self.rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif kind == 'positive':
            value = self.rng.uniform(0.5, 1.5, size=shape)
        else:
            value = 0.1 * self.rng.normal(size=shape)
        return torch.tensor(value, dtype=torch.float32)

    def conv(self, name, x, out, kernel=1, stride=1, padding=0):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        s = self.state
        if f'{name}.conv.weight' not in s:
            s[f'{name}.conv.weight'] = self._new((out, x.shape[1], kh, kw), 'kernel')
            s[f'{name}.bn.weight'] = self._new((out, ), 'positive')
            s[f'{name}.bn.bias'] = self._new((out, ), 'normal')
            s[f'{name}.bn.running_mean'] = self._new((out, ), 'normal')
            s[f'{name}.bn.running_var'] = self._new((out, ), 'positive')
            s[f'{name}.bn.num_batches_tracked'] = torch.tensor(0)
        x = F.conv2d(x, s[f'{name}.conv.weight'], stride=stride, padding=padding)
        x = F.batch_norm(x,
                         s[f'{name}.bn.running_mean'],
                         s[f'{name}.bn.running_var'],
                         s[f'{name}.bn.weight'],
                         s[f'{name}.bn.bias'],
                         training=False,
                         eps=1e-3)
        return F.relu(x)

    @staticmethod
    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def block_a(self, n, x, pool_features):
        b1 = self.conv(f'{n}.branch1x1', x, 64)
        b5 = self.conv(f'{n}.branch5x5_2', self.conv(f'{n}.branch5x5_1', x, 48), 64, 5, padding=2)
        bd = self.conv(f'{n}.branch3x3dbl_1', x, 64)
        bd = self.conv(f'{n}.branch3x3dbl_2', bd, 96, 3, padding=1)
        bd = self.conv(f'{n}.branch3x3dbl_3', bd, 96, 3, padding=1)
        bp = self.conv(f'{n}.branch_pool', self.avg(x), pool_features)
        return torch.cat([b1, b5, bd, bp], 1)

    def block_b(self, n, x):
        b3 = self.conv(f'{n}.branch3x3', x, 384, 3, stride=2)
        bd = self.conv(f'{n}.branch3x3dbl_1', x, 64)
        bd = self.conv(f'{n}.branch3x3dbl_2', bd, 96, 3, padding=1)
        bd = self.conv(f'{n}.branch3x3dbl_3', bd, 96, 3, stride=2)
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)

    def block_c(self, n, x, c7):
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = self.conv(f'{n}.branch1x1', x, 192)
        b7 = self.conv(f'{n}.branch7x7_1', x, c7)
        b7 = self.conv(f'{n}.branch7x7_2', b7, c7, **row)
        b7 = self.conv(f'{n}.branch7x7_3', b7, 192, **col)
        bd = self.conv(f'{n}.branch7x7dbl_1', x, c7)
        bd = self.conv(f'{n}.branch7x7dbl_2', bd, c7, **col)
        bd = self.conv(f'{n}.branch7x7dbl_3', bd, c7, **row)
        bd = self.conv(f'{n}.branch7x7dbl_4', bd, c7, **col)
        bd = self.conv(f'{n}.branch7x7dbl_5', bd, 192, **row)
        bp = self.conv(f'{n}.branch_pool', self.avg(x), 192)
        return torch.cat([b1, b7, bd, bp], 1)

    def block_d(self, n, x):
        b3 = self.conv(f'{n}.branch3x3_2', self.conv(f'{n}.branch3x3_1', x, 192), 320, 3, 2)
        b7 = self.conv(f'{n}.branch7x7x3_1', x, 192)
        b7 = self.conv(f'{n}.branch7x7x3_2', b7, 192, (1, 7), padding=(0, 3))
        b7 = self.conv(f'{n}.branch7x7x3_3', b7, 192, (7, 1), padding=(3, 0))
        b7 = self.conv(f'{n}.branch7x7x3_4', b7, 192, 3, stride=2)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    def block_e(self, n, x, max_pool):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = self.conv(f'{n}.branch1x1', x, 320)
        b3 = self.conv(f'{n}.branch3x3_1', x, 384)
        b3 = torch.cat([
            self.conv(f'{n}.branch3x3_2a', b3, 384, **row),
            self.conv(f'{n}.branch3x3_2b', b3, 384, **col)
        ], 1)
        bd = self.conv(f'{n}.branch3x3dbl_1', x, 448)
        bd = self.conv(f'{n}.branch3x3dbl_2', bd, 384, 3, padding=1)
        bd = torch.cat([
            self.conv(f'{n}.branch3x3dbl_3a', bd, 384, **row),
            self.conv(f'{n}.branch3x3dbl_3b', bd, 384, **col)
        ], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else self.avg(x)
        bp = self.conv(f'{n}.branch_pool', pooled, 192)
        return torch.cat([b1, b3, bd, bp], 1)

    def __call__(self, x):
        """x [N, 3, H, W] in [0, 1] -> pool3 features [N, 2048]."""
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1
        x = self.conv('Conv2d_1a_3x3', x, 32, 3, stride=2)
        x = self.conv('Conv2d_2a_3x3', x, 32, 3)
        x = self.conv('Conv2d_2b_3x3', x, 64, 3, padding=1)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv('Conv2d_3b_1x1', x, 80)
        x = self.conv('Conv2d_4a_3x3', x, 192, 3)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.block_a('Mixed_5b', x, 32)
        x = self.block_a('Mixed_5c', x, 64)
        x = self.block_a('Mixed_5d', x, 64)
        x = self.block_b('Mixed_6a', x)
        for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e',
                                                                                   192)):
            x = self.block_c(name, x, c7)
        x = self.block_d('Mixed_7a', x)
        x = self.block_e('Mixed_7b', x, max_pool=False)
        x = self.block_e('Mixed_7c', x, max_pool=True)
        return F.adaptive_avg_pool2d(x, 1)[:, :, 0, 0]


@pytest.fixture(scope='module')
def torch_parity():
    """(uint8 images [2, 32, 32, 3], torch features [2, 2048], numpy torch state_dict)."""
    if torch is None:
        pytest.skip('needs torch: pip install -e .[interop]')
    images = np.random.default_rng(7).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    net = _TorchFIDInception(seed=8)
    x = torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float32) / 255.0
    with torch.no_grad():
        feats = net(x).numpy()
    state = {k: v.numpy() for k, v in net.state.items()}
    state['fc.weight'] = np.zeros((1008, 2048), np.float32)  # the checkpoint's unused head
    state['fc.bias'] = np.zeros((1008, ), np.float32)
    return images, feats, state


def test_features_match_independent_torch_reference(torch_parity, tmp_path):
    images, want, state = torch_parity
    flat = convert_inception.convert(state)
    np.savez(tmp_path / 'inception.npz', **flat)  # the converter's output, through the loader
    variables = inception.load_params(str(tmp_path / 'inception.npz'))
    got = np.asarray(inception.features(variables, images))
    assert got.shape == want.shape == (2, inception.FEATURE_DIM)
    assert np.abs(want).mean() > 0.1  # activations neither vanished nor exploded
    assert np.abs(want[0] - want[1]).max() > 1e-2  # the two images are told apart
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
