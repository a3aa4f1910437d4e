"""Reading and writing: Orbax checkpoints, pretrained weights (HF safetensors, GGUF) and
tokenizers."""
