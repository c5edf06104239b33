"""Import a Hugging Face GPT-2 model directory into an hpc_llm checkpoint (`hpc-llm import-gpt2 DIR --out CKPT`).

The directory is what `GPT2LMHeadModel.save_pretrained(dir)` (or a hub snapshot) holds:

    config.json                     model_type "gpt2", n_embd, n_layer, n_head, n_positions, vocab_size, ...
    model.safetensors               the tensors (or model.safetensors.index.json + shards, as large models are saved)

Tensors are read with the `safetensors` package's NumPy API (`pip install hpc_llm[import]`); PyTorch is not needed.
Our parameter names are Hugging Face's without the `transformer.` prefix and our weights are stored (in, out) like its
Conv1D, so the mapping is a rename plus two details: the token embedding is padded with zero rows to
`ModelConfig.padded_vocab`, and the LM head must be tied to it (`lm_head.weight`, when the file has it, must equal
`wte.weight`). The causal-mask buffers `attn.bias` / `attn.masked_bias` of older files are ignored.

Only what our model computes is accepted: tanh-GELU (`gelu_new` / `gelu_pytorch_tanh`), LayerNorm eps 1e-5, a 4x MLP,
attention scaled by 1/sqrt(head_dim) and nothing else, no cross-attention, a tied head. Anything else is a UserError
naming the field, never a silently different model. Float16/bfloat16/float64 tensors are converted to float32.

The checkpoint is the one `Trainer.save` writes at step 0 (zero Adam moments, empty metrics), so
`hpc_llm.load_model(path)` loads it and `hpc-llm train CONFIG --resume path`
fine-tunes it when CONFIG's [model] section matches (n_layer, n_head, n_embd, block_size = n_positions, vocab_size).

The tokenizer comes from the same directory when it has one: `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`
(hpc_llm/data/tokenizer.py, the `tokenizers` package). The checkpoint's state then records it whole (its JSON and
sha256, docs/checkpoint-format.md), and `hpc-llm generate CKPT --prompt TEXT` needs nothing else. Its vocabulary may not
be larger than the model's. A directory without tokenizer files gives a checkpoint of ids only: the state records
`{"tokenizer": "gpt2-bpe", "vocab_size": V}`, `hpc_llm.load_tokenizer` (and `hpc-llm generate`) raise a UserError on
it, and the Python API works on token ids:

    model = hpc_llm.load_model("gpt2.h5")
    logits = model.logits(ids[None])          # ids: an int array of GPT-2 token ids
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from hpc_llm.checkpoint.serial import save_fresh_checkpoint
from hpc_llm.config import Config, ModelConfig
from hpc_llm.config.checks import validated
from hpc_llm.data.tokenizer import BPETokenizer, find_tokenizer_files
from hpc_llm.errors import UserError
from hpc_llm.model.layout import param_specs
from hpc_llm.parallel.comm import world_comm
from hpc_llm.runtime.fsio import check_output

__all__ = [
    "import_gpt2",
    "read_gpt2_dir",
    "read_gpt2_config",
    "load_gpt2_tensors",
    "gpt2_tensors_to_params",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "transformer."
TOKENIZER_META_NAME = "gpt2-bpe"
# both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
_REQUIRED = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers, not parameters


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------------
# config.json


def _read_config_json(model_dir: Path) -> tuple[Path, dict]:
    """(the path of config.json, its object), the directory and the file checked."""
    if not model_dir.exists():
        raise UserError(f"{model_dir}: GPT-2 model directory does not exist")
    if not model_dir.is_dir():
        raise UserError(
            f"{model_dir}: is not a directory (expected a Hugging Face GPT-2 model directory with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (expected a Hugging Face GPT-2 config.json)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({_one_line(exc)})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return path, hf


def _check_sizes(path: Path, hf: dict) -> None:
    """A GPT-2 config with the sizes we need, positive integers, n_embd a multiple of n_head."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise UserError(
            f'{path}: model_type is {model_type!r}, expected "gpt2" (only GPT-2 models can be imported)'
        )
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise UserError(
            f"{path}: missing {', '.join(missing)} (a GPT-2 config needs {', '.join(_REQUIRED)})"
        )
    for key in _REQUIRED:
        value = hf[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: {key} is {value!r}, expected a positive integer")
    n_embd, n_head = hf["n_embd"], hf["n_head"]
    if n_embd % n_head:
        raise UserError(f"{path}: n_embd={n_embd} is not a multiple of n_head={n_head}")


def _check_computation(path: Path, hf: dict) -> None:
    """Options of transformers' GPT2Config that change the computation: each must be what our model computes
    (absent keys take GPT2Config's defaults)."""

    def unsupported(key: str, value, expected: str) -> UserError:
        return UserError(f"{path}: {key} is {value!r}, but hpc_llm implements only {expected}")

    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise unsupported(
            "activation_function", act, " or ".join(f'"{a}"' for a in ACTIVATIONS) + " (tanh GELU)"
        )
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if (
        not isinstance(eps, (int, float))
        or isinstance(eps, bool)
        or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-9)
    ):
        raise unsupported("layer_norm_epsilon", eps, "1e-05")
    n_inner, n_embd = hf.get("n_inner"), hf["n_embd"]
    if n_inner is not None and n_inner != 4 * n_embd:
        raise unsupported("n_inner", n_inner, f"null or 4 * n_embd = {4 * n_embd}")
    for key, ours in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        value = hf.get(key, ours)
        if value is not ours:
            what = (
                "a head tied to wte (untied LM heads are unsupported)"
                if key == "tie_word_embeddings"
                else f"{key} = {str(ours).lower()}"
            )
            raise unsupported(key, value, what)


def read_gpt2_config(model_dir) -> tuple[Config, dict]:
    """(our Config, the raw config.json dict) for a GPT-2 directory; UserError for anything we do not implement."""
    path, hf = _read_config_json(Path(model_dir))
    _check_sizes(path, hf)
    _check_computation(path, hf)
    cfg = Config()
    cfg.model = ModelConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        dropout=0.0,
        dtype="float32",
    )
    return validated(cfg), hf


# ---------------------------------------------------------------------------------------------------------------------
# model.safetensors


def _safetensors():
    try:
        import safetensors
        from safetensors import safe_open
    except ImportError:
        raise UserError(
            "importing GPT-2 weights needs the safetensors package: pip install hpc_llm[import]"
        ) from None
    return safetensors, safe_open


def _bf16_tensors(safetensors, path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """bfloat16 tensors (NumPy has no bfloat16): the package's deserializer gives their raw little-endian bytes, and a
    bfloat16 is the upper half of a float32."""
    wanted, out = set(keys), {}
    for name, view in safetensors.deserialize(path.read_bytes()):
        if name in wanted:
            bits = np.frombuffer(view["data"], dtype="<u2").astype("<u4") << 16
            out[name] = bits.view("<f4").reshape(view["shape"])
    return out


def _read_file(path: Path, into: dict[str, np.ndarray], only: set[str] | None = None) -> None:
    safetensors, safe_open = _safetensors()
    try:
        with safe_open(str(path), framework="np") as f:
            bf16 = []
            for key in f.keys():
                if only is not None and key not in only:
                    continue
                if key in into:
                    raise UserError(f"{path}: tensor {key} appears in more than one file")
                try:
                    into[key] = f.get_tensor(key)
                    # ml_dtypes imported: NumPy knows the name, its kind is V
                    if into[key].dtype.name == "bfloat16":
                        # exact, as the raw-bytes path below gives
                        into[key] = into[key].astype(np.float32)
                except (
                    TypeError
                ) as exc:  # "data type 'bfloat16' not understood" (ml_dtypes not imported)
                    if "bfloat16" not in str(exc):
                        raise
                    bf16.append(key)
        if bf16:
            into.update(_bf16_tensors(safetensors, path, bf16))
    except UserError:
        raise
    except Exception as exc:  # SafetensorError (not exported by every version), OSError, ...
        raise UserError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None


def load_gpt2_tensors(model_dir) -> dict[str, np.ndarray]:
    """Every tensor of `model_dir/model.safetensors` (or of the shards its index names), as NumPy arrays."""
    model_dir = Path(model_dir)
    single, index = model_dir / WEIGHTS_FILE, model_dir / INDEX_FILE
    tensors: dict[str, np.ndarray] = {}
    if single.is_file():
        _read_file(single, tensors)
        return tensors
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f'{index}: expected JSON with a "weight_map" object ({_one_line(exc)})'
            ) from None
        shards: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(str(name), set()).add(key)
        for name, keys in shards.items():
            shard = model_dir / name
            if not shard.is_file():
                raise UserError(f"{shard}: not found (named by {INDEX_FILE})")
            _read_file(shard, tensors, only=keys)
            absent = keys - tensors.keys()
            if absent:
                raise UserError(
                    f"{shard}: has no tensor {sorted(absent)[0]} (named by {INDEX_FILE})"
                )
        return tensors
    hint = ""
    if (model_dir / "pytorch_model.bin").exists():
        hint = " (only safetensors is read: re-save with save_pretrained(dir, safe_serialization=True))"
    raise UserError(f"{single}: not found{hint}")


# ---------------------------------------------------------------------------------------------------------------------
# the mapping


def _match_tensors(tensors: dict, expected: dict, cfg: ModelConfig, source: str):
    """(our name -> (their key, tensor), the lm_head tensor or None): every parameter found once, nothing else."""
    found: dict[str, tuple[str, np.ndarray]] = {}
    head = None
    unexpected = []
    for key, value in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name in expected:
            if name in found:
                raise UserError(
                    f"{source}: tensor {name} appears twice ({found[name][0]} and {key})"
                )
            found[name] = (key, value)
        elif key == "lm_head.weight":
            head = value
        elif name.startswith("h.") and name.endswith(_BUFFERS):
            continue
        else:
            unexpected.append(key)
    if unexpected:
        raise UserError(
            f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all; a GPT-2 LM has "
            "wte, wpe, h.N.{ln_1,attn,ln_2,mlp}.*, ln_f and optionally a tied lm_head)"
        )
    missing = [n for n in expected if n not in found]
    if missing:
        raise UserError(
            f"{source}: missing tensor {PREFIX}{missing[0]} ({len(missing)} missing in all) for a "
            f"{cfg.n_layer}-layer GPT-2"
        )
    return found, head


def _converted(spec, key: str, value, cfg: ModelConfig, source: str) -> np.ndarray:
    """One tensor checked (shape, floating point, finite) and copied to our dtype; wte padded with zero rows."""
    V, C = cfg.vocab_size, cfg.n_embd
    arr = np.asarray(value)
    want = (V, C) if spec.name == "wte.weight" else spec.shape
    if tuple(arr.shape) != want:
        raise UserError(
            f"{source}: tensor {key} has shape {tuple(arr.shape)}, expected {want} from config.json"
        )
    if arr.dtype.kind != "f":
        raise UserError(
            f"{source}: tensor {key} has dtype {arr.dtype}, expected a floating-point type"
        )
    if not np.isfinite(arr).all():
        raise UserError(f"{source}: tensor {key} contains NaN or infinite values")
    dtype = np.dtype(cfg.dtype)
    if spec.name == "wte.weight":
        out = np.zeros(spec.shape, dtype=dtype)
        out[:V] = arr
        return out
    return np.array(arr, dtype=dtype, order="C")  # a copy: the inputs may be read-only memory maps


def gpt2_tensors_to_params(
    tensors: dict, cfg: ModelConfig, source: str = WEIGHTS_FILE
) -> dict[str, np.ndarray]:
    """Hugging Face GPT-2 tensors (keys with or without `transformer.`) -> our parameters in `cfg.dtype`, in
    `param_specs` order, wte padded with zero rows to `cfg.padded_vocab`. `source` names the file in errors."""
    specs = param_specs(cfg)
    found, head = _match_tensors(tensors, {s.name: s.shape for s in specs}, cfg, source)
    params = {s.name: _converted(s, *found[s.name], cfg, source) for s in specs}
    if head is not None:
        wte = found["wte.weight"][1]
        if tuple(np.shape(head)) != (cfg.vocab_size, cfg.n_embd) or not np.array_equal(head, wte):
            raise UserError(
                f"{source}: lm_head.weight differs from {found['wte.weight'][0]}; untied LM heads are "
                "unsupported (hpc_llm's head is the token embedding)"
            )
    return params


def read_gpt2_dir(model_dir) -> tuple[Config, dict[str, np.ndarray]]:
    """(Config, parameters) of a Hugging Face GPT-2 directory, checked; nothing written."""
    cfg, _ = read_gpt2_config(model_dir)
    tensors = load_gpt2_tensors(model_dir)
    source = str(Path(model_dir) / WEIGHTS_FILE)
    return cfg, gpt2_tensors_to_params(tensors, cfg.model, source=source)


# ---------------------------------------------------------------------------------------------------------------------
# the checkpoint


def import_gpt2(model_dir, out, force: bool = False) -> Path:
    """Convert a Hugging Face GPT-2 directory into an hpc_llm checkpoint at `out` (a .h5 file path, parents made);
    returns its path. The checkpoint is a step-0 training checkpoint: zero Adam moments, empty metrics. `out` is never
    a file of `model_dir`; an existing file is replaced (atomically) only with `force`."""
    out = Path(out)
    if out.is_dir():
        raise UserError(
            f"{out}: is a directory; --out expects a checkpoint file path such as {out / 'gpt2.h5'}"
        )
    check_output(out, "import-gpt2 --out", (model_dir,), force, parent_must_exist=False)
    cfg, params = read_gpt2_dir(model_dir)
    V = cfg.model.vocab_size
    tokenizer = {"tokenizer": TOKENIZER_META_NAME, "vocab_size": V}
    if find_tokenizer_files(model_dir) is not None:
        tok = BPETokenizer.from_dir(model_dir, TOKENIZER_META_NAME)
        if tok.vocab_size > V:
            raise UserError(
                f"{model_dir}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                f"vocab_size {V} in {CONFIG_FILE}"
            )
        tokenizer = tok.meta()
    state = {"tokenizer": tokenizer, "data_path": ""}
    # every rank would write the same file: refused on each alike (the world size is known everywhere), after the
    # inputs' own checks (the same verdict on every rank), before anything is created
    if (ranks := world_comm().size) > 1:
        raise UserError(
            f"hpc-llm import-gpt2 runs on one process, got {ranks} ranks: run it without mpiexec"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create directory {out.parent} ({_one_line(exc)})") from None
    try:
        save_fresh_checkpoint(out, params, state, cfg.to_dict())
    except OSError as exc:
        raise UserError(f"{out}: cannot write checkpoint ({_one_line(exc)})") from None
    return out
