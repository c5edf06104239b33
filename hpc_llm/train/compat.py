"""Another checkpoint as a run's input: --resume's files and train.init_from, opened and checked against the run's
model config and data before any compute (the tensors' checksums come with the restore)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from hpc_llm import checkpoint as ckpt
from hpc_llm.config import Config, ModelConfig, config_from_dict
from hpc_llm.config.checks import canonical_targets
from hpc_llm.data.tokenizer import check_same_tokenizer
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import UserError

log = logging.getLogger("hpc_llm")

# head_size and mlp_width: a pruned model's widths (model.head_dim, model.n_inner; 0 means GPT-2's)
MODEL_FIELDS = (
    "n_layer",
    "n_head",
    "n_embd",
    "head_size",
    "mlp_width",
    "block_size",
    "vocab_size",
    "dtype",
    "bias",
)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def check_compatible(mine: ModelConfig, saved, data: TokenData, is_root: bool) -> None:
    """The model section must match the checkpoint's (model.vocab_size = 0 takes the checkpoint's); training settings
    may change (e.g. a longer run). ``saved``: a CheckpointFile, or anything with its path, state and config."""
    theirs = config_from_dict(saved.config).model
    mine = dataclasses.replace(mine, vocab_size=mine.vocab_size or theirs.vocab_size)
    for k in MODEL_FIELDS:
        if getattr(mine, k) != getattr(theirs, k):
            raise UserError(
                f"checkpoint {saved.path}: model.{k}={getattr(theirs, k)} but the config says "
                f"{getattr(mine, k)}"
            )
    # the data must be tokenized as the checkpoint's was: the same ids would mean other text (the one check,
    # shared with eval; an ids-only gpt2-bpe import cannot be checked and only warns: the user vouches)
    warning = check_same_tokenizer(
        saved.state.get("tokenizer"),
        data.tokenizer.meta(),
        f"checkpoint {saved.path}",
        f"data.path={data.path}",
    )
    if warning:
        (log.warning if is_root else log.debug)("%s", warning)


def _lora_field(m: ModelConfig, key: str):
    """A LoRA field of a model config as compared on resume and init_from: lora_targets in the canonical order (a
    checkpoint's config may predate config validation sorting them)."""
    return canonical_targets(m.lora_targets) if key == "lora_targets" else getattr(m, key)


def open_checkpoint(path: Path, mine: ModelConfig, data: TokenData, is_root: bool):
    """Open a checkpoint to resume and check its header, model and adapters (closed again if a check fails)."""
    saved = ckpt.CheckpointFile(path)
    try:
        check_compatible(mine, saved, data, is_root)
        theirs = config_from_dict(saved.config).model
        lora = LORA_FIELDS if mine.lora_rank or theirs.lora_rank else ()
        for (
            k
        ) in lora:  # a resume continues the same adapters (targets in any order: the same model)
            if _lora_field(mine, k) != _lora_field(theirs, k):
                raise UserError(
                    f"checkpoint {saved.path}: model.{k}={getattr(theirs, k)} but the config says "
                    f"{getattr(mine, k)}"
                )
    except BaseException:
        saved.close()
        raise
    return saved


class _ConfigView:
    """A checkpoint as check_compatible reads it (path, state, config), with model.block_size set to the run's:
    init_from may crop the position embedding, every other model field must match."""

    def __init__(self, saved: ckpt.CheckpointFile, block_size: int):
        self._saved = saved
        self.config = {
            **saved.config,
            "model": {**saved.config.get("model", {}), "block_size": block_size},
        }

    def __getattr__(self, name):  # path, state, ...: the checkpoint's own
        return getattr(self._saved, name)


def open_init_from(cfg: Config, data: TokenData, is_root: bool):
    """Open train.init_from and check it against the config: the model section must be the checkpoint's
    (check_compatible, tokenizer included), except that a smaller model.block_size crops the position embedding,
    and the LoRA fields: adapters the checkpoint lacks start from the seed, adapters it has must be the config's
    (merge them first for another setting). Closed again if a check fails."""
    init_from = cfg.train.init_from
    path = Path(init_from)
    if path.is_dir():  # a run directory: its newest verified checkpoint, as `generate` takes it
        found = ckpt.find_latest(path)
        if found is None:
            raise UserError(
                f"train.init_from={init_from}: no verified checkpoint in this directory"
            )
        path = found
    try:
        saved = ckpt.CheckpointFile(path)
    except UserError as e:
        raise UserError(f"train.init_from: {e}") from None
    try:
        _check_init_from(cfg.model, saved, data, init_from, is_root)
    except BaseException:
        saved.close()
        raise
    return saved


def _check_init_from(mine: ModelConfig, saved, data: TokenData, init_from: str, is_root: bool):
    theirs = config_from_dict(saved.config).model
    if mine.block_size > theirs.block_size:
        raise UserError(
            f"train.init_from={init_from}: model.block_size={mine.block_size} is larger than "
            f"the checkpoint's {theirs.block_size} (a smaller one crops its position embedding)"
        )
    try:
        check_compatible(mine, _ConfigView(saved, block_size=mine.block_size), data, is_root)
    except UserError as e:
        raise UserError(f"train.init_from: {e}") from None
    if theirs.lora_rank > 0 and any(
        _lora_field(mine, k) != _lora_field(theirs, k) for k in LORA_FIELDS
    ):
        raise UserError(
            f"train.init_from={init_from}: the checkpoint has LoRA adapters (model.lora_rank="
            f"{theirs.lora_rank}, lora_alpha={theirs.lora_alpha}, lora_targets="
            f"{theirs.lora_targets}) the config does not: fold them into the weights with "
            f"`hpc-llm merge-lora` first"
        )


def open_teacher(cfg: Config, data: TokenData, vocab_size: int, is_root: bool):
    """Open train.teacher (a checkpoint, or a run directory's newest) and check it can teach this run: the data's
    tokenizer, the same vocabulary (model.vocab_size = vocab_size, the run's resolved one), a block_size covering
    the run's, a layout its heads fit (parallel.tp divides its n_head), no LoRA adapters left unmerged; its sizes
    are otherwise its own. Closed again if a check fails."""
    name = f"train.teacher={cfg.train.teacher}"
    path = Path(cfg.train.teacher)
    if path.is_dir():
        found = ckpt.find_latest(path)
        if found is None:
            raise UserError(f"{name}: no verified checkpoint in this directory")
        path = found
    try:
        saved = ckpt.CheckpointFile(path)
    except UserError as e:
        raise UserError(f"train.teacher: {e}") from None
    try:
        _check_teacher(cfg, config_from_dict(saved.config).model, vocab_size, name)
        warning = check_same_tokenizer(
            saved.state.get("tokenizer"), data.tokenizer.meta(), name, f"data.path={data.path}"
        )
        if warning:
            (log.warning if is_root else log.debug)("%s", warning)
    except BaseException:
        saved.close()
        raise
    return saved


def _check_teacher(cfg: Config, theirs: ModelConfig, vocab_size: int, name: str) -> None:
    mine, tp = cfg.model, cfg.parallel.tp
    if theirs.vocab_size != vocab_size:
        raise UserError(
            f"{name}: its vocabulary has {theirs.vocab_size} tokens, the run's {vocab_size}: a teacher "
            "must share the student's tokenizer"
        )
    if theirs.block_size < mine.block_size:
        raise UserError(
            f"{name}: its block_size={theirs.block_size} is smaller than model.block_size={mine.block_size}"
        )
    if theirs.n_head % tp or theirs.mlp_width % tp:
        raise UserError(
            f"{name}: parallel.tp={tp} does not divide its n_head={theirs.n_head} and MLP width "
            f"{theirs.mlp_width}"
        )
    if theirs.lora_rank > 0:
        raise UserError(
            f"{name}: it has LoRA adapters: fold them into its weights with `hpc-llm merge-lora` first"
        )


def checkpoint_vocab(saved) -> int:
    """The vocabulary a checkpoint's model was trained with."""
    return config_from_dict(saved.config).model.vocab_size
