"""Tools around checkpoints: the GPT-2 import, merge-lora, inspect."""
