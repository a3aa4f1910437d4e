"""Host-side sampling and dense packing of uneven clients."""
import numpy as np
import pytest

from fedgen.data import batching


def test_sampling_is_a_function_of_seed_and_round():
    a = batching.sample_clients(3, 7, 100, 10)
    assert np.array_equal(a, batching.sample_clients(3, 7, 100, 10))
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, batching.sample_clients(3, 8, 100, 10))
    with pytest.raises(ValueError, match=r'^clients_per_round must be in \[1, num_clients=5\]'):
        batching.sample_clients(0, 0, 5, 6)
    with pytest.raises(ValueError, match=r'^fed\.clients_per_round .*\[1, fed\.num_clients=5\]'):
        batching.sample_clients(0, 0, 5, 6, section='fed.')


def test_pack_covers_each_local_example_once_per_epoch():
    examples = {'x': np.arange(100) * 10}
    clients = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 30)]
    s = batching.num_local_steps([len(c) for c in clients], batch_size=4, epochs=2)
    assert s == 2 * 5
    data = batching.pack_clients(examples,
                                 clients, [0, 1, 2],
                                 seed=0,
                                 rnd=0,
                                 batch_size=4,
                                 epochs=2,
                                 steps=s)
    assert data.batches['x'].shape == (3, s, 4) and data.mask.shape == (3, s)
    np.testing.assert_array_equal(data.n_k, [7, 3, 20])
    for k, idx in enumerate(clients):
        w = data.batches['weight'][k].astype(bool)
        seen = np.sort(data.batches['x'][k][w] // 10)
        np.testing.assert_array_equal(seen, np.sort(np.concatenate([idx, idx])))
        # Valid steps: 2 epochs x ceil(n/4); the rest are masked padding.
        assert data.mask[k].sum() == 2 * -(-len(idx) // 4)


def test_pack_is_deterministic_and_round_dependent():
    ex = {'x': np.arange(50)}
    cl = [np.arange(50)]
    a = batching.pack_clients(ex, cl, [0], 1, 4, 5, 1, 10)
    b = batching.pack_clients(ex, cl, [0], 1, 4, 5, 1, 10)
    c = batching.pack_clients(ex, cl, [0], 1, 5, 5, 1, 10)
    np.testing.assert_array_equal(a.batches['x'], b.batches['x'])
    assert not np.array_equal(a.batches['x'], c.batches['x'])


def test_step_cap_and_padding_clients():
    ex = {'x': np.arange(40)}
    cl = [np.arange(40), np.arange(3)]
    s = batching.num_local_steps([40, 3], 4, 1, max_steps=2)
    assert s == 2
    data = batching.pack_clients(ex, cl, [0, 1], 0, 0, 4, 1, s, max_steps=2)
    assert data.batches['weight'][0].sum() == 8
    padded = batching.pad_clients(data, 4)
    assert padded.n_k.shape == (4, ) and padded.n_k[2:].sum() == 0 and padded.mask[2:].sum() == 0


def test_batch_all_weights_padding():
    out = batching.batch_all({'x': np.arange(10)}, 4)
    assert out['x'].shape == (3, 4)
    assert out['weight'].sum() == 10
    np.testing.assert_array_equal(out['x'][out['weight'] > 0], np.arange(10))


def test_bad_values():
    with pytest.raises(ValueError, match=r'^local_epochs'):
        batching.num_local_steps([3], 2, 0)
    with pytest.raises(ValueError, match=r'^fed\.batch_size'):
        batching.num_local_steps([3], 0, 1, section='fed.')
