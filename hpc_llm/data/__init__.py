"""The corpus and its tokens: tokenizers, preparing token files from text, reading them, and sampling batches."""
