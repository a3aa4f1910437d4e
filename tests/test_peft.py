"""PEFT round trip: fedgen adapters exported in PEFT format, loaded by ``peft`` onto the torch
transformers model with the same weights, give the same logits (and back, and merged)."""
import jax
import numpy as np
import pytest

from fedgen.lora import adapters as lora
from fedgen.lora import peft
from fedgen.models import gpt, llama
from fedgen.io import weights_hf
from helpers_models import TINY_GPT2_HF, TINY_LLAMA_HF

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft_lib = pytest.importorskip('peft')

ALPHA = 16.0
TOKENS = np.random.default_rng(1).integers(0, 61, (2, 12))


def _torch_model(arch, tmp_path):
    torch.manual_seed(0)
    if arch == 'llama':
        cfg = transformers.LlamaConfig(**TINY_LLAMA_HF, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(**TINY_GPT2_HF, initializer_range=0.2)
        model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / 'base')
    return model.eval(), weights_hf.load_hf_dir(str(tmp_path / 'base'), lora_alpha=ALPHA)


def _ours(bb, adapters):
    m = llama.Llama(bb.config) if bb.arch == 'llama' else gpt.GPT(bb.config)
    return np.asarray(jax.jit(m.apply)({'params': bb.params, 'lora': adapters}, TOKENS))


def _random_adapters(params, rules, rank):
    ad = lora.init(jax.random.PRNGKey(3), params, rules, rank)
    rng = np.random.default_rng(4)
    return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), ad)


def safetensors_names(path):
    from safetensors import safe_open
    with safe_open(str(path), framework='np') as f:
        return list(f.keys())


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize('arch,rules', [('llama', 'llama_qv'), ('llama', 'llama_attn_mlp'),
                                        ('gpt2', 'qv'), ('gpt2', 'attn_mlp')])
def test_export_loads_in_peft_with_same_logits(tmp_path, arch, rules):
    model, bb = _torch_model(arch, tmp_path)
    np.testing.assert_allclose(_ours(bb, {}), _torch_logits(model), atol=1e-4, rtol=1e-4)
    ad = _random_adapters(bb.params, rules, 4)
    ours = _ours(bb, ad)
    assert np.abs(ours - _ours(bb, {})).max() > 0.1  # the adapters matter
    cfg = peft.export_adapter(str(tmp_path / 'ad'), bb.arch, bb.params, ad, ALPHA, 'tiny')
    if arch == 'gpt2':  # q, v (k, v) share one c_attn adapter of rank m r, alpha m alpha
        m = 2 if rules == 'qv' else 3
        assert cfg['target_modules'][0] == 'attn.c_attn'
        if rules == 'qv':
            assert (cfg['r'], cfg['lora_alpha'], cfg['rank_pattern']) == (8, 32.0, {})
        else:
            assert (cfg['r'], cfg['lora_alpha']) == (4, ALPHA)
            assert set(cfg['rank_pattern'].values()) == {m * 4}
    else:
        assert (cfg['r'], cfg['lora_alpha']) == (4, ALPHA)
        want = ['q_proj', 'v_proj'] if rules == 'llama_qv' else [
            'down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'
        ]
        assert cfg['target_modules'] == want
    names = safetensors_names(tmp_path / 'ad' / 'adapter_model.safetensors')
    block = 'model.layers' if arch == 'llama' else 'transformer.h'
    assert {f'{block}.0', f'{block}.1'} <= {'.'.join(n.split('.')[2:5]) for n in names}
    ref = _torch_logits(peft_lib.PeftModel.from_pretrained(model, str(tmp_path / 'ad')).eval())
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    back = peft.import_adapter(str(tmp_path / 'ad'), bb.arch, ALPHA)
    np.testing.assert_allclose(_ours(bb, back), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_merged_export_loads_in_transformers(tmp_path, arch):
    _, bb = _torch_model(arch, tmp_path)
    ad = _random_adapters(bb.params, 'llama_attn_mlp' if arch == 'llama' else 'qv_mlp', 2)
    peft.export_merged(str(tmp_path / 'merged'), bb.arch, bb.config, bb.params, ad, ALPHA)
    cls = transformers.LlamaForCausalLM if arch == 'llama' else transformers.GPT2LMHeadModel
    merged = cls.from_pretrained(str(tmp_path / 'merged')).eval()
    np.testing.assert_allclose(_torch_logits(merged), _ours(bb, ad), atol=1e-4, rtol=1e-4)
    again = weights_hf.load_hf_dir(str(tmp_path / 'merged'))
    np.testing.assert_allclose(_ours(again, {}), _ours(bb, ad), atol=1e-4, rtol=1e-4)


def test_import_native_peft_adapter_rslora(tmp_path):
    """An adapter PEFT itself wrote (rsLoRA, alpha 8, a per-module rank) imports exactly."""
    model, bb = _torch_model('llama', tmp_path)
    conf = peft_lib.LoraConfig(r=4,
                               lora_alpha=8,
                               target_modules=['q_proj', 'v_proj', 'up_proj'],
                               rank_pattern={'up_proj': 2},
                               use_rslora=True,
                               init_lora_weights=False)
    pm = peft_lib.get_peft_model(model, conf).eval()
    pm.save_pretrained(str(tmp_path / 'native'))
    ad = peft.import_adapter(str(tmp_path / 'native'), 'llama', ALPHA)
    assert ad['layers']['mlp']['up_proj']['a'].shape == (2, 32, 2)  # [L, in, r] per rank_pattern
    assert ad['layers']['self_attn']['q_proj']['b'].shape == (2, 4, 32)
    np.testing.assert_allclose(_ours(bb, ad), _torch_logits(pm), atol=1e-4, rtol=1e-4)


def test_import_needs_every_layer_at_one_rank(tmp_path):
    model, bb = _torch_model('llama', tmp_path)
    conf = peft_lib.LoraConfig(r=4, target_modules=['q_proj'], layers_to_transform=[1])
    peft_lib.get_peft_model(model, conf).save_pretrained(str(tmp_path / 'one'))
    with pytest.raises(ValueError, match='^path: layers_0 is missing'):
        peft.import_adapter(str(tmp_path / 'one'), 'llama', ALPHA)
    conf = peft_lib.LoraConfig(r=4,
                               target_modules=['q_proj'],
                               rank_pattern={r'model\.layers\.1\.self_attn\.q_proj': 2})
    model, _ = _torch_model('llama', tmp_path)  # get_peft_model wraps a model in place: a fresh one
    peft_lib.get_peft_model(model, conf).save_pretrained(str(tmp_path / 'ranks'))
    with pytest.raises(ValueError, match=r'^path: layers_1/.*\(stacked layers need'):
        peft.import_adapter(str(tmp_path / 'ranks'), 'llama', ALPHA)


def test_import_errors(tmp_path):
    with pytest.raises(ValueError, match='^path: .* must hold adapter_config.json'):
        peft.import_adapter(str(tmp_path), 'llama', ALPHA)
    with pytest.raises(ValueError, match='^lora.init_from: .* must hold adapter_config.json'):
        peft.import_adapter(str(tmp_path), 'llama', ALPHA, 'lora.init_from')
    (tmp_path / 'adapter_config.json').write_text('{"peft_type": "IA3"}')
    (tmp_path / 'adapter_model.safetensors').write_bytes(b'')
    with pytest.raises(ValueError, match="peft_type 'IA3' is not LORA"):
        peft.import_adapter(str(tmp_path), 'llama', ALPHA)


def test_export_cli_reads_a_workdir(tmp_path):
    """experiments.export on a run directory: the global adapter from the Orbax server state and
    client K's from the personal trees, through an hf_dir backbone."""
    import optax

    from configs import ptb_fedgen_edge
    from experiments import export
    from fedgen.fl import algorithm as base
    from fedgen.io import checkpoint
    model, bb = _torch_model('llama', tmp_path)
    ad = _random_adapters(bb.params, 'llama_qv', 4)
    work = tmp_path / 'run'
    work.mkdir()
    c = ptb_fedgen_edge.get_config('tiny')  # a whole run config, as experiments.train writes it
    c.model.update(name='llama', source=f'hf_dir:{tmp_path / "base"}')
    c.lora.update(alpha=ALPHA, rank=4)
    c.checkpoint.keep = 2
    (work / 'config.json').write_text(c.to_json_best_effort(indent=1))
    trainable = {'lora': ad}
    state = base.ServerState(round=np.int32(3),
                             trainable=trainable,
                             opt_state=optax.adam(1e-3).init(trainable),
                             rng=jax.random.PRNGKey(0))
    mngr = checkpoint.manager(str(work), 2)
    checkpoint.save(mngr, 3, state=state)
    checkpoint.wait(mngr)
    personal = jax.tree.map(lambda x: np.stack([x, 2 * x, -x]), trainable)
    checkpoint.save_personal(str(work), 3, personal)

    msg = export.export(str(work), str(tmp_path / 'g'))
    assert 'round 3' in msg and 'global' in msg
    ref = _torch_logits(peft_lib.PeftModel.from_pretrained(model, str(tmp_path / 'g')).eval())
    np.testing.assert_allclose(_ours(bb, ad), ref, atol=1e-4, rtol=1e-4)

    export.export(str(work), str(tmp_path / 'c1'), client=1)
    back = peft.import_adapter(str(tmp_path / 'c1'), 'llama', ALPHA)
    np.testing.assert_allclose(back['layers']['self_attn']['v_proj']['b'][1],
                               2 * ad['layers']['self_attn']['v_proj']['b'][1],
                               rtol=1e-6)
    with pytest.raises(ValueError, match='--client must be in'):
        export.export(str(work), str(tmp_path / 'c9'), client=9)
