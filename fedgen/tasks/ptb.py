"""The PTB language-modeling task: data, model, loss and evaluation, from a config.

Data flow. ptb.train is cut into windows [M, T+1] (stride T). The first ``data.public_fraction``
of the windows, in text order, is the server's *public* portion used only for pre-training the
backbone; the rest is the client pool, disjoint from it. The pool is partitioned over
``fed.num_clients`` clients (default 'topic': windows are grouped into pseudo-documents, clustered
into topics by TF-IDF spherical k-means, and topics are spread over clients with Dirichlet(alpha)),
and each client's windows are split into local train and local test parts. Validation and test PPL
use the official ptb.valid / ptb.test windows.
"""
import dataclasses

import jax
import numpy as np

from fedgen import objectives, tasks
from fedgen.data import batching
from fedgen.metrics import dataset_loss
from fedgen.data import partition, ptb, topics
from fedgen.models import gpt

PARTITIONS = ('topic', 'iid', 'shards', 'quantity')


def validate(config) -> None:
    """One-line ValueErrors for the data/fed fields this task reads, before any loading."""
    tasks.validate_split(config, PARTITIONS)
    d = config.data
    if not (isinstance(d.seq_len, int) and 2 <= d.seq_len <= config.model.n_positions):
        raise ValueError(
            f'data.seq_len must be in [2, model.n_positions={config.model.n_positions}]'
            f', got {d.seq_len}')


def model_config(config, vocab_size: int) -> gpt.GPTConfig:
    m = config.model
    cfg = gpt.GPTConfig(vocab_size=vocab_size,
                        n_positions=m.n_positions,
                        n_embd=m.n_embd,
                        n_layer=m.n_layer,
                        n_head=m.n_head,
                        lora_alpha=float(config.lora.alpha))
    gpt.validate(cfg)
    return cfg


def split_clients(config, pool_windows: np.ndarray, vocab_size: int):
    """(client_train, client_test, labels) for the pool, deterministic from config.seed."""
    p, seed, n = config.data.partition, config.seed, len(pool_windows)
    labels = np.full(n, -1, np.int32)
    if p.kind == 'topic':
        labels = topics.topic_labels(pool_windows, p.num_topics, seed, p.doc_windows, vocab_size)
        parts = partition.make('dirichlet_label',
                               n,
                               config.fed.num_clients,
                               seed,
                               labels=labels,
                               alpha=p.alpha,
                               min_size=p.min_size)
    else:
        parts = partition.make(p.kind,
                               n,
                               config.fed.num_clients,
                               seed,
                               alpha=p.alpha,
                               min_size=p.min_size)
    train, test = partition.local_split(parts, p.local_test_fraction, seed)
    return train, test, labels


def prepare(config) -> tasks.Task:
    """Loads PTB (data.source), builds windows, the public/pool split and the client partition."""
    validate(config)
    data = ptb.load_ptb(config.data.source, verify=config.data.verify_md5)
    t = config.data.seq_len
    win = ptb.windows(data.train, t)
    n_pub = int(round(config.data.public_fraction * len(win)))
    public, pool = win[:n_pub], win[n_pub:]
    if len(pool) < config.fed.num_clients:
        raise ValueError(f'fed.num_clients={config.fed.num_clients} exceeds the {len(pool)} '
                         f'client windows (lower it or data.public_fraction)')
    train, test, labels = split_clients(config, pool, len(data.vocab))
    cfg = model_config(config, len(data.vocab))
    model = gpt.GPT(cfg)
    loss_fn = objectives.next_token_loss(model)
    splits = {
        'valid': {
            'tokens': ptb.windows(data.valid, t)
        },
        'test': {
            'tokens': ptb.windows(data.test, t)
        }
    }
    info = {
        **tasks.client_sizes(train), 'public_windows': len(public),
        'pool_windows': len(pool),
        'valid_windows': len(splits['valid']['tokens']),
        'model': dataclasses.asdict(cfg)
    }
    return tasks.Task(
        name='ptb',
        metric='valid_ppl',
        loss_fn=loss_fn,
        pool={'tokens': pool},
        client_train=train,
        client_test=test,
        public={'tokens': public},
        valid=splits['valid'],
        test=splits['test'],
        labels=labels,
        recipe=recipe(config),
        info=info,
        init_backbone=lambda rng: gpt.init_params(cfg, rng),
        backbone_shapes=lambda: jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.PRNGKey(0))),
        evaluator=lambda split, aux: evaluator(loss_fn, splits[split], split, config.eval.batch_size
                                               ),
        sample=lambda variables, rng: samples(model, data.vocab, config.eval, variables, rng),
        sample_kind='text',
        client_metric=('ppl', np.exp))


def recipe(config) -> dict:
    """What determines the pre-trained backbone (its cache key)."""
    return {
        'task': 'ptb',
        'seed': config.seed,
        'model': config.model.to_dict(),
        'pretrain': {
            k: v
            for k, v in config.pretrain.to_dict().items() if k != 'backbone_path'
        },
        'public': {
            'source': config.data.source,
            'seq_len': config.data.seq_len,
            'public_fraction': config.data.public_fraction
        }
    }


def samples(model: gpt.GPT, vocab: tuple, ev, variables: dict, rng) -> list[str]:
    """ev.num_samples texts of ev.sample_len words sampled after '<eos>' (a sentence start)."""
    prompt = np.full((ev.num_samples, 1), vocab.index('<eos>'), np.int32)
    out = jax.jit(lambda v, r: gpt.generate(model, v, prompt, ev.sample_len, r))(variables, rng)
    return [ptb.decode(row[1:], vocab).replace('\n', ' / ') for row in np.asarray(out)]


def evaluator(loss_fn, examples: dict, split: str, batch_size: int):
    """A jitted evaluate(variables) -> {'<split>_loss', '<split>_ppl'} over ``examples``.

    The loss is the mean NLL per predicted token over all windows; ppl = exp(loss)."""
    batches = batching.batch_all(examples, batch_size)
    loss = jax.jit(
        lambda v: dataset_loss.dataset_loss(loss_fn, v, batches, jax.random.PRNGKey(0))[0])

    def evaluate(variables) -> dict:
        value = float(loss(variables))
        return {f'{split}_loss': value, f'{split}_ppl': float(np.exp(value))}

    return evaluate
