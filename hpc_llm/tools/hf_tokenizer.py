"""A checkpoint's tokenizer as Hugging Face tokenizer files (what `hpc-llm export-hf` writes beside the model).

    bpe, gpt2-bpe   tokenizer.json is the checkpoint's own `tokenizers` JSON, byte for byte (its sha256 is the one the
                    checkpoint records); "<|endoftext|>", when the vocabulary has it, is the bos/eos/unk token
    byte            a byte-level BPE with the 256 byte symbols as its vocabulary (id = the byte's value) and no merges:
                    it encodes any text to its UTF-8 bytes, as ours does
    char            a BPE whose vocabulary is the characters (id = the position in the sorted vocabulary) with no merges
                    and no pre-tokenizer: one token per character, decoded by concatenation; unlike ours, which refuses
                    a character outside the vocabulary, it drops one
    gpt2-bpe without its JSON (imported from a directory without tokenizer files): nothing is written

tokenizer_config.json names PreTrainedTokenizerFast, which loads tokenizer.json as it is (no prefix space added, no
special tokens inserted), model_max_length = block_size, and the model's inputs (no token_type_ids).
"""

from __future__ import annotations

import json

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from hpc_llm.config import ModelConfig
from hpc_llm.data.tokenizer import GPT2_EOS, BPETokenizer, tokenizer_from_meta
from hpc_llm.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: the printable character that stands for each byte in byte-level BPE vocabularies."""
    kept = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_tokenizer_json() -> str:
    symbols = gpt2_byte_symbols()
    tok = tokenizers.Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def char_tokenizer_json(chars: str) -> str:
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def tokenizer_files(meta, m: ModelConfig, source) -> tuple[dict[str, str], int | None, list[str]]:
    """({file name: text}, the bos/eos id or None, notes) for a checkpoint's tokenizer meta."""
    if not isinstance(meta, dict):
        return {}, None, ["no tokenizer in the checkpoint: none written (the model works on ids)"]
    name = meta.get("tokenizer")
    if name == "gpt2-bpe" and "tokenizer_json" not in meta:
        return (
            {},
            None,
            [
                "the checkpoint has ids only (imported without tokenizer files): no tokenizer written"
            ],
        )
    try:
        tok = tokenizer_from_meta(meta)
    except UserError as e:
        raise UserError(f"{source}: the tokenizer recorded in the checkpoint: {e}") from None
    special, notes = None, []
    if isinstance(tok, BPETokenizer):
        text = tok.json
        special = tokenizers.Tokenizer.from_str(text).token_to_id(GPT2_EOS)
    elif name == "byte":
        text = byte_tokenizer_json()
        notes.append(
            "byte tokenizer written as a byte-level BPE without merges (ids = UTF-8 bytes)"
        )
    else:
        text = char_tokenizer_json(tok.chars)
        notes.append(
            "char tokenizer written as a BPE without merges: characters outside its vocabulary are dropped"
        )
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": m.block_size,
        "clean_up_tokenization_spaces": False,
        # GPT-2 would add wte rows for token_type_ids, which older transformers' tokenizers return by default
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if special is not None:
        config.update(bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS)
    return (
        {TOKENIZER_FILE: text, TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2) + "\n"},
        special,
        notes,
    )
