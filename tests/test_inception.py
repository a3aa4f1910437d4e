"""Tests for fedgen.metrics.inception (random weights) and experiments/convert_inception.py."""
import numpy as np
import pytest
from flax import traverse_util

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
    with pytest.raises(ValueError, match='metrics.inception_path'):
        inception.load_params(str(tmp_path / 'absent.npz'))

    missing = dict(flat)
    del missing['batch_stats/Mixed_6c/branch7x7dbl_4/bn/var']
    np.savez(tmp_path / 'missing.npz', **missing)
    with pytest.raises(ValueError, match='metrics.inception_path.*missing.*branch7x7dbl_4'):
        inception.load_params(str(tmp_path / 'missing.npz'))

    wrong = dict(flat)
    wrong['params/Mixed_5b/branch5x5_2/conv/kernel'] = np.zeros((3, 3, 48, 64), np.float32)
    np.savez(tmp_path / 'wrong.npz', **wrong)
    with pytest.raises(ValueError, match='metrics.inception_path.*wrong shape.*branch5x5_2'):
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
