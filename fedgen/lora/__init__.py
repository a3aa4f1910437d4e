"""LoRA adapters: the adapter math, heterogeneous ranks, upload bytes and the Hugging Face
PEFT format."""
