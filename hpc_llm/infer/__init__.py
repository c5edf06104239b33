"""Inference: generation (batched, tensor-parallel, KV cache), int8 weights, evaluation on a split."""
