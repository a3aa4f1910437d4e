"""Tiny Hugging Face models the interop tests share (test_weights, test_peft, test_llama), as the
keyword arguments of ``transformers.GPT2Config`` / ``transformers.LlamaConfig`` (config.json
names). Each test adds what it varies (tied head, RMSNorm eps, RoPE theta, init scale).

TINY_GPT2_HF: 2 layers, width 32, 4 heads, 16 positions, vocabulary 61.
TINY_LLAMA_HF: 2 layers, width 32, GQA with 4 query heads over 2 KV heads (head dim 8), SwiGLU
width 48, 32 positions, vocabulary 61, RoPE theta 1e5; init std 0.2 so every leaf matters.
"""

TINY_GPT2_HF = dict(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4)

TINY_LLAMA_HF = dict(vocab_size=61,
                     hidden_size=32,
                     intermediate_size=48,
                     num_hidden_layers=2,
                     num_attention_heads=4,
                     num_key_value_heads=2,
                     max_position_embeddings=32,
                     rope_theta=1e5,
                     initializer_range=0.2)
