#!/usr/bin/env python3
"""Mutation campaign: does the test suite notice the one-line slips a careful engineer could make?

Each mutant below is one targeted edit of one source file (the exact original snippet, which must occur exactly once
in that file, and its replacement) with a one-line description and the tests relevant to it. The campaign

1. copies the repository once into a temporary directory: the files `git ls-files --cached --others
   --exclude-standard` lists (tracked files as they are in the working tree, plus untracked, non-ignored ones, so
   tests being written are included), or with ``--rev REV`` the tree of commit REV (``git archive``), optionally
   with ``--overlay PATH`` files taken from the working tree on top (e.g. a new test file);
2. proves that the copy is what runs: ``import hpc_llm`` from the copy's PYTHONPATH resolves into the copy (the
   venv's editable install points at the repository itself), and a canary written into the copy only is seen by the
   pytest process, by a ``python -m hpc_llm`` subprocess, by ranks started with ``mpiexec`` and by mpi-pytest's
   ranks; it aborts otherwise;
3. runs an unmutated baseline of every test selection used and aborts if any is red (a red baseline would make
   every mutant look killed);
4. for each mutant writes the mutated file into the copy, runs ``pytest -x -q -p no:cacheprovider <selection>``
   there with the venv's python (with a per-mutant timeout), restores the file, and records the result: killed (a
   test failed or errored), survived (the selection passed), timeout, or error (pytest could not run the tests:
   a collection/usage error, reported separately, never counted as killed; a test that fails only by hitting
   pytest-timeout counts as a timeout, not a kill); a mutant whose snippet is no longer found exactly once is
   reported as stale, not skipped silently. A red baseline selection is run once more before the campaign aborts
   (the machine may be shared); green the second time, it is reported as flaky.

The environment of every pytest run is what scripts/test.sh sets (the venv's bin first on PATH, Open MPI allowed as
root, one BLAS/OpenMP thread, OPAL_PREFIX/PMIX_PREFIX = the venv), plus PYTHONPATH = the copy (inherited by the
subprocesses and mpiexec ranks the tests start) and PYTHONDONTWRITEBYTECODE=1 (a mutant of the same size written
within the same second as the original must never be served from a stale .pyc). Nothing under the repository is
ever written: mutants are applied to the copy only.

Run it from the repository root (it takes a while: run it in the background and watch stderr):

    .venv/bin/python scripts/mutation_campaign.py --list          # the mutants, checked against the source
    .venv/bin/python scripts/mutation_campaign.py                 # baseline + every mutant
    .venv/bin/python scripts/mutation_campaign.py --only ln-unbiased-var,adam-no-bias-correction-1
    .venv/bin/python scripts/mutation_campaign.py --rev HEAD --overlay tests/test_optim.py   # working tree mid-edit

Results: a Markdown table (id, file, description, tests run, result, seconds) on stdout and in ``--out`` (default
/tmp/mutation_results.md), the same as JSON beside it (``--json``, default: the same name with .json), and a summary
line "killed K / N, survived S: ids...". docs/testing.md holds the table of results of the last full campaign.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_PYTHON = "/work/main/.venv/bin/python"
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-rfEs"]


# ---------------------------------------------------------------------------------------------------------------------
# The mutants


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    description: str
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root
    k: str | None = None  # pytest -k expression
    # the same slip written against other versions of the code: (original, replacement) in the same file, or
    # (file, original, replacement) where the code moved; the first variant that applies is used
    alternatives: tuple[tuple[str, ...], ...] = ()
    timeout: float | None = None  # seconds; default: from the baseline's duration

    def variants(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.original, self.replacement)] + [
            alt if len(alt) == 3 else (self.file, *alt) for alt in self.alternatives
        ]

    def resolve(self, read) -> tuple[str, str | None, str]:
        """read(file) -> its text or None. Returns (file, mutated text, "") for the first variant whose original
        occurs exactly once, else (self.file, None, why the mutant is stale)."""
        found = []
        for file, original, replacement in self.variants():
            text = read(file)
            n = text.count(original) if text is not None else 0
            if n == 1:
                return file, text.replace(original, replacement, 1), ""
            found.append(f"{n} times in {file}" if text is not None else f"{file} missing")
        return (
            self.file,
            None,
            f"stale: the original snippet must occur exactly once, found {'; '.join(found)}",
        )


LAYOUT, SHARD_IO, KV_CACHE = (
    "hpc_llm/model/layout.py",
    "hpc_llm/model/shard_io.py",
    "hpc_llm/model/kv_cache.py",
)
LAYERS, GPT, TPAR = (
    "hpc_llm/model/layers.py",
    "hpc_llm/model/gpt.py",
    "hpc_llm/model/tensor_parallel.py",
)
OPTIM, DPAR, TRAIN = (
    "hpc_llm/train/optim.py",
    "hpc_llm/parallel/data_parallel.py",
    "hpc_llm/train/trainer.py",
)
CKPT, GEN, DATA = (
    "hpc_llm/checkpoint/reader.py",
    "hpc_llm/infer/generate.py",
    "hpc_llm/data/prepare.py",
)
TSTATE = "hpc_llm/checkpoint/trainer_state.py"
MODULES = "hpc_llm/model/modules.py"  # since the pipeline-parallel refactor: Embedding, Block, Head, Chunk

T_GRAD, T_GEN, T_TRAIN = "tests/test_gradients.py", "tests/test_generate.py", "tests/test_train.py"
T_OPTIM, T_DATA, T_CKPT = "tests/test_optim.py", "tests/test_data.py", "tests/test_checkpoint.py"
T_GPT2_LOGITS = "tests/test_gpt2_import.py::test_logits_equal_reference"
HF_LOGITS = (
    "tests/test_gpt2_import.py::test_logits_match_transformers"  # a committed transformers fixture
)
HF_GRADS = "tests/test_gpt2_import.py::test_loss_and_gradients_match_transformers"
T_TRAIN_RESUME = (
    "tests/test_train.py::test_exact_resume",
    "tests/test_train.py::test_resume_auto_takes_newest_and_empty_dir_starts_fresh",
)
T_PAR_RESUME = "tests/test_parallel.py::test_exact_resume_dp2_zero1"
T_RESUME_LAYOUTS = "tests/test_resume_layouts.py"
T_CLI_GENERATE = "tests/test_cli.py::test_generate_from_checkpoint"
EVAL = "hpc_llm/infer/evaluate.py"


def inf_test(name: str) -> str:
    return f"tests/test_inference.py::{name}"


def tp_test(name: str) -> str:
    return f"tests/test_tensor_parallel.py::{name}"


def par_layout(layout: str) -> str:
    """One layout of test_parallel's end-to-end comparison with the single process (e.g. "DP2-zero1")."""
    return f"tests/test_parallel.py::test_training_matches_single_process[{layout}]"


def M(id, file, original, replacement, description, tests, **kw) -> Mutant:
    return Mutant(id, file, original, replacement, description, tuple(tests), **kw)


MUTANTS: list[Mutant] = [
    # -- layers: layernorm, gelu, attention / softmax / causal mask, linear, embedding backward, dropout -------------
    M(
        "ln-unbiased-var",
        LAYERS,
        "var *= 1.0 / x.shape[-1]",
        "var *= 1.0 / (x.shape[-1] - 1)",
        "LayerNorm forward normalises by the unbiased variance (divides by C-1, torch.var's default)",
        [T_GRAD, T_GPT2_LOGITS, HF_LOGITS],
    ),
    M(
        "ln-bwd-mean-without-gain",
        LAYERS,
        "mean_d = dxhat.mean(axis=-1, keepdims=True)",
        "mean_d = dout.mean(axis=-1, keepdims=True)",
        "LayerNorm backward subtracts the mean of dout instead of dout*w (the gain left out of one term)",
        [T_GRAD, HF_GRADS],
    ),
    M(
        "ln-dw-accumulate-overwrites",
        LAYERS,
        'dw += xp.einsum("ni,ni->i", d2, x2)',
        'dw[...] = xp.einsum("ni,ni->i", d2, x2)',
        "LayerNorm gain gradient overwritten on accumulate=True (micro-batches after the first lose the earlier ones)",
        [T_GRAD],
    ),
    M(
        "gelu-fwd-cubic-without-c",
        LAYERS,
        "ts *= GELU_C * 0.044715",
        "ts *= 0.044715",
        "GELU forward: tanh(c x + 0.044715 x^3) instead of tanh(c (x + 0.044715 x^3))",
        [T_GRAD, T_GPT2_LOGITS, HF_LOGITS],
    ),
    M(
        "gelu-bwd-missing-3",
        LAYERS,
        "ins *= 0.5 * 3 * 0.044715 * GELU_C",
        "ins *= 0.5 * 0.044715 * GELU_C",
        "GELU backward: d/dx of x^3 written as x^2 (the factor 3 dropped)",
        [T_GRAD, HF_GRADS],
    ),
    M(
        "causal-mask-no-offset",
        LAYERS,
        "i = xp.arange(Tq)[:, None] + (Tk - Tq)",
        "i = xp.arange(Tq)[:, None]",
        "causal mask assumes queries start at position 0 (wrong for query blocks and for KV-cache decoding)",
        [T_GRAD, T_GEN],
    ),
    M(
        "attn-scale-no-sqrt",
        LAYERS,
        "q *= 1.0 / math.sqrt(q.shape[-1])",
        "q *= 1.0 / q.shape[-1]",
        "attention scores scaled by 1/hd instead of 1/sqrt(hd) (equivalent only when hd = 1)",
        [T_GRAD, T_GEN, T_GPT2_LOGITS, HF_LOGITS],
        alternatives=(
            ("qkvh[0] *= 1.0 / math.sqrt(qkvh.shape[-1])", "qkvh[0] *= 1.0 / qkvh.shape[-1]"),
        ),
    ),
    M(
        "softmax-bwd-rowdot-dropped-probs",
        LAYERS,
        'rowdot = xp.einsum("bhij,bhij->bhi", datt, att)[..., None]',
        'rowdot = xp.einsum("bhij,bhij->bhi", datt, used)[..., None]',
        "softmax backward's row sum uses the dropped-out probabilities (wrong only with attention dropout)",
        [T_GRAD],
    ),
    M(
        "attn-bwd-dq-unscaled",
        LAYERS,
        "dq *= 1.0 / math.sqrt(hd)",
        "dq *= 1.0",
        "attention backward forgets the 1/sqrt(hd) of the pre-scaled q in dq (equivalent only when hd = 1)",
        [T_GRAD, HF_GRADS],
    ),
    M(
        "linear-dw-ignores-accumulate",
        LAYERS,
        "_matmul_into(x2.T, d2, dw, accumulate)",
        "_matmul_into(x2.T, d2, dw, False)",
        "linear backward always overwrites the weight gradient (gradient accumulation keeps the last micro-batch)",
        [T_GRAD],
        alternatives=(
            ("matmul_into(x2.T, d2, dw, accumulate)", "matmul_into(x2.T, d2, dw, False)"),
        ),
    ),
    M(
        "embedding-bwd-fancy-index-add",
        LAYERS,
        "xp.add.at(dwte, idx.reshape(-1), dx.reshape(-1, dx.shape[-1]))",
        "dwte[idx.reshape(-1)] += dx.reshape(-1, dx.shape[-1])",
        "token embedding backward with fancy-index += (a token repeated in the batch is counted once)",
        [T_GRAD, HF_GRADS],
    ),
    M(
        "wpe-bwd-zeroes-used-rows",
        LAYERS,
        "dwpe[T:] = 0",
        "dwpe[:T] = 0",
        "position embedding backward zeroes the rows it then overwrites, leaving stale gradient beyond T",
        [T_GRAD],
    ),
    M(
        "dropout-scale-keep-prob",
        LAYERS,
        "mask *= 1.0 / (1.0 - p)",
        "mask *= 1.0 - p",
        "dropout scales kept activations by (1-p) instead of 1/(1-p) (forward and backward consistent; train/eval "
        "mismatch)",
        [T_GRAD, T_TRAIN],
    ),
    M(
        "dropout-rng-heads-slice",
        LAYERS,
        "row[...] = gen.random((n, *row.shape[1:]), dtype=dtype)[h0:h1]",
        "row[...] = gen.random((n, *row.shape[1:]), dtype=dtype)[:h1 - h0]",
        "attention dropout under TP: every rank takes the first heads' masks, not its own heads'",
        [par_layout("TP2-zero0")],
    ),
    # -- the model: forward/backward wiring, residuals, tied embedding, loss scale, KV cache --------------------------
    M(
        "ln2-bwd-residual-dropped",
        GPT,
        "dx += L.layernorm_backward(dh2, ln2",
        "dx = L.layernorm_backward(dh2, ln2",
        "block backward: the MLP branch's gradient replaces the residual stream's instead of adding to it",
        [T_GRAD, HF_GRADS],
        alternatives=(
            (
                MODULES,
                "dx += self.ln_2.backward(dh2, ln2, accumulate)",
                "dx = self.ln_2.backward(dh2, ln2, accumulate)",
            ),
            (
                MODULES,
                "dx += self.ln_2.backward(dh2, c.ln_2, accumulate)",
                "dx = self.ln_2.backward(dh2, c.ln_2, accumulate)",
            ),
        ),
    ),
    M(
        "ln2-forward-uses-ln1-gain",
        GPT,
        'h2, ln2 = L.layernorm_forward(x, p["ln_2.weight"][0], p["ln_2.bias"][0])',
        'h2, ln2 = L.layernorm_forward(x, p["ln_1.weight"][0], p["ln_2.bias"][0])',
        "ln_2 normalises with ln_1's gain (copy-paste slip; in the modules.py version forward and backward "
        "agree, so only a reference comparison can see it)",
        [T_GRAD, T_GEN, T_GPT2_LOGITS, HF_LOGITS],
        alternatives=(
            (
                MODULES,
                'self.ln_2 = LayerNorm(p["ln_2.weight"], b["ln_2.bias"], prec)',
                'self.ln_2 = LayerNorm(p["ln_1.weight"], b["ln_2.bias"], prec)',
            ),
        ),
    ),
    M(
        "ce-bwd-ignores-loss-scale",
        GPT,
        "dlogits = TP.vocab_parallel_cross_entropy_backward(ce, loss_scale)",
        "dlogits = TP.vocab_parallel_cross_entropy_backward(ce)",
        "backward ignores loss_scale (the trainer's 1/(grad_accum*dp) averaging is lost)",
        [T_GRAD, HF_GRADS, T_TRAIN, par_layout("DP2-zero0")],
        alternatives=(
            (
                MODULES,
                "TP.vocab_parallel_cross_entropy_backward(ce, loss_scale)",
                "TP.vocab_parallel_cross_entropy_backward(ce)",
            ),
            (
                MODULES,
                "vocab_parallel_cross_entropy_backward(ce, loss_scale)",
                "vocab_parallel_cross_entropy_backward(ce)",
            ),
        ),
    ),
    M(
        "kv-cache-positions-restart",
        GPT,
        'x = TP.vocab_parallel_embedding_forward(P["wte.weight"], P["wpe.weight"], idx, self.v0, tp, pos0)',
        'x = TP.vocab_parallel_embedding_forward(P["wte.weight"], P["wpe.weight"], idx, self.v0, tp)',
        "KV-cache decoding: each new chunk gets position embeddings from 0 instead of from cache.length",
        [T_GEN],
        alternatives=(
            (
                "x, _ = chunk.embedding.forward(idx, pos0=pos0)",
                "x, _ = chunk.embedding.forward(idx)",
            ),
        ),
    ),
    M(
        "kv-cache-stores-k-as-v",
        GPT,
        "kv[1, :, :, pos0:end] = qkvh[2]",
        "kv[1, :, :, pos0:end] = qkvh[1]",
        "KV cache: the keys are stored in the value slot",
        [T_GEN],
        alternatives=(
            (LAYERS, "kv[1, :, :, pos0:end] = qkvh[2]", "kv[1, :, :, pos0:end] = qkvh[1]"),
        ),
    ),
    M(
        "qkv-shard-ignores-blocks",
        GPT,
        '(p + "attn.c_attn.weight", (C, 3 * C), std, True, 1, 3),',
        '(p + "attn.c_attn.weight", (C, 3 * C), std, True, 1, 1),',
        "TP sharding of the fused qkv weight is contiguous (tp_blocks=1): a rank gets q and part of k, not its heads",
        [tp_test("test_shard_index_and_full_tensors"), tp_test("test_gpt_equals_single_process")],
        alternatives=(
            (
                LAYOUT,
                '_weight(p + "attn.c_attn.weight", (C, 3 * C), std, tp_axis=1, tp_blocks=3),',
                '_weight(p + "attn.c_attn.weight", (C, 3 * C), std, tp_axis=1, tp_blocks=1),',
            ),
        ),
    ),
    # -- tensor parallel: f/g backward, vocab-parallel embedding and cross-entropy, gather ---------------------------
    M(
        "tp-f-bwd-no-allreduce",
        TPAR,
        "return comm.allreduce_(dx)",
        "return dx",
        "f (copy_to_tp_region) backward returns the local gradient instead of the sum over the TP group",
        [
            tp_test("test_attention_block"),
            tp_test("test_mlp_block"),
            tp_test("test_gpt_equals_single_process"),
        ],
    ),
    M(
        "tp-g-bwd-allreduces",
        TPAR,
        '"""g, backward: the gradient of a sum reaches every partial unchanged."""\n    return dx',
        '"""g, backward: the gradient of a sum reaches every partial unchanged."""\n    return comm.allreduce_(dx)',
        "g (reduce_from_tp_region) backward allreduces too: row-parallel inputs get tp times their gradient",
        [
            tp_test("test_attention_block"),
            tp_test("test_mlp_block"),
            tp_test("test_gpt_equals_single_process"),
        ],
    ),
    M(
        "tp-tied-wte-grad-overwritten",
        TPAR,
        "return L.embedding_backward(dx, idx, dwte_local, dwpe, accumulate)",
        "return L.embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate_wte=accumulate)",
        "tied embedding: the token embedding's backward overwrites the LM head's gradient already in wte's grad",
        [T_GRAD, HF_GRADS],
        alternatives=(
            (
                "return L.embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate_wte)",
                "return L.embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate)",
            ),
            (
                "return embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate_wte)",
                "return embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate)",
            ),
        ),
    ),
    M(
        "tp-vocab-emb-bwd-skips-first-row",
        TPAR,
        "mine = (local >= 0) & (local < dwte_local.shape[0])",
        "mine = (local > 0) & (local < dwte_local.shape[0])",
        "vocab-parallel embedding backward drops the first row of each rank's vocabulary slice",
        [tp_test("test_vocab_parallel_embedding"), tp_test("test_gpt_equals_single_process")],
    ),
    M(
        "tp-ce-padding-negative-start",
        TPAR,
        "logits[:, max(0, vocab_size - v0):] = -xp.inf",
        "logits[:, vocab_size - v0:] = -xp.inf",
        "vocab-parallel CE: a slice that is all padding gets a negative start and masks only its last columns",
        [
            T_GRAD,
            tp_test("test_vocab_parallel_cross_entropy"),
            tp_test("test_gpt_equals_single_process"),
        ],
        alternatives=(
            (
                "logits[:, max(0, vocab_size - v0) :] = -xp.inf",
                "logits[:, vocab_size - v0 :] = -xp.inf",
            ),
        ),
    ),
    M(
        "tp-ce-target-logit-not-reduced",
        TPAR,
        "comm.allreduce_(target_logit)",
        "pass",
        "vocab-parallel CE: the target logit is not summed over the TP group (only its owner knows it)",
        [tp_test("test_vocab_parallel_cross_entropy"), tp_test("test_gpt_equals_single_process")],
    ),
    M(
        "ce-bwd-not-mean",
        TPAR,
        "probs *= scale / N",
        "probs *= scale",
        "cross-entropy backward forgets the 1/N of the mean over rows",
        [T_GRAD, HF_GRADS],
    ),
    M(
        "tp-gather-no-moveaxis",
        TPAR,
        "return xp.moveaxis(flat, 0, -2).reshape(*x.shape[:-1], comm.size * n)",
        "return flat.reshape(*x.shape[:-1], comm.size * n)",
        "gather_from_tp_region reshapes the (rank, ...) buffer without moving the rank axis next to the last",
        [tp_test("test_gather_from_tp_region"), tp_test("test_gpt_equals_single_process")],
    ),
    # -- the optimizer: AdamW, the lr schedule, the gradient norm ----------------------------------------------------
    M(
        "adam-no-bias-correction-1",
        OPTIM,
        '"step": lr * sqrt_bc2 / (1.0 - b1 ** self.t),',
        '"step": lr * sqrt_bc2,',
        "AdamW without the first moment's bias correction 1/(1-b1^t)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "adam-bc2-no-sqrt",
        OPTIM,
        "sqrt_bc2 = math.sqrt(1.0 - b2 ** self.t)",
        "sqrt_bc2 = 1.0 - b2 ** self.t",
        "AdamW's second-moment bias correction without the square root",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "adam-eps-uncorrected",
        OPTIM,
        '"eps": c.eps * sqrt_bc2,',
        '"eps": c.eps,',
        "AdamW eps added to sqrt(v) before the bias correction (eps/sqrt(bc2) in PyTorch's terms: a small effect, "
        "largest in the first steps)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "adamw-decay-without-lr",
        OPTIM,
        '"keep": 1.0 - lr * c.weight_decay,',
        '"keep": 1.0 - c.weight_decay,',
        "decoupled weight decay not scaled by lr (p *= 1 - wd every step)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "adamw-decay-everything",
        OPTIM,
        "decayed = any(ra <= a and b <= rb for ra, rb in decay_ranges)",
        "decayed = any(ra <= a or b <= rb for ra, rb in decay_ranges)",
        "weight decay also applied to LayerNorm gains and biases (`or` for `and` in the range test)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "adam-m-uses-beta2",
        OPTIM,
        "mc *= b1",
        "mc *= b2",
        "AdamW's first moment decays with beta2 (the beta misused)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "adam-clip-once-in-v",
        OPTIM,
        '"g2": (1.0 - b2) * grad_scale * grad_scale,',
        '"g2": (1.0 - b2) * grad_scale,',
        "the clip factor folded into v once instead of squared (only matters on clipped steps)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "lr-warmup-from-zero",
        OPTIM,
        "return t.lr * (step + 1) / (t.warmup_iters + 1)",
        "return t.lr * step / t.warmup_iters",
        "warmup starts at lr 0 (step 0 does nothing) and ends at lr, not nanoGPT's (step+1)/(warmup+1)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "lr-cosine-sign",
        OPTIM,
        "return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)",
        "return t.min_lr + 0.5 * (1.0 - math.cos(math.pi * ratio)) * (t.lr - t.min_lr)",
        "cosine schedule upside down: after warmup the lr rises from min_lr to lr",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "lr-cosine-no-floor",
        OPTIM,
        "return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)",
        "return 0.5 * (1.0 + math.cos(math.pi * ratio)) * t.lr",
        "cosine decays to 0 instead of to the min_lr floor (then jumps to min_lr after lr_decay_iters)",
        [T_OPTIM, T_TRAIN],
    ),
    M(
        "grad-norm-not-reduced",
        OPTIM,
        "return math.sqrt(comm.allreduce_scalar(local))",
        "return math.sqrt(local)",
        "global gradient norm not summed over the group (each rank clips by its own shard's norm)",
        [T_OPTIM, par_layout("DP2-zero1"), par_layout("TP2-zero0")],
    ),
    # -- gradient sync: 1/dp averaging, grad_accum scale, clipping, ZeRO-1 ownership ---------------------------------
    M(
        "loss-scale-no-dp",
        TRAIN,
        "loss_scale=1.0 / (t.grad_accum * dp)",
        "loss_scale=1.0 / t.grad_accum",
        "the data-parallel sum is not averaged (gradients dp times too large)",
        [par_layout("DP2-zero0")],
        alternatives=(("loss_scale / (t.grad_accum * dp)", "loss_scale / t.grad_accum"),),
    ),
    M(
        "loss-scale-no-grad-accum",
        TRAIN,
        "loss_scale=1.0 / (t.grad_accum * dp)",
        "loss_scale=1.0 / dp",
        "gradient accumulation sums the micro-batches' gradients instead of averaging them (Adam is nearly "
        "scale-invariant, but the grad norm, the clipping threshold and eps see grad_accum times the gradient)",
        [T_OPTIM, T_TRAIN, par_layout("DP2-zero0")],
        alternatives=(("loss_scale / (t.grad_accum * dp)", "loss_scale / dp"),),
    ),
    M(
        "clip-min-max",
        TRAIN,
        "scale = min(1.0, t.grad_clip / (norm + 1e-6))",
        "scale = max(1.0, t.grad_clip / (norm + 1e-6))",
        "clip factor with max for min: small gradients are scaled up to the clip norm, large ones pass unclipped",
        [T_OPTIM, T_TRAIN],
        alternatives=(
            (
                "clip = min(1.0, t.grad_clip / (norm + 1e-6))",
                "clip = max(1.0, t.grad_clip / (norm + 1e-6))",
            ),
        ),
    ),
    M(
        "zero-norm-over-tp-group",
        TRAIN,
        "comm = self.grid.world if self.sync.zero else self.grid.tp_comm",
        "comm = self.grid.tp_comm",
        "ZeRO-1: the grad norm sums only this rank's shard (not over the data-parallel group)",
        [T_OPTIM, par_layout("DP2-zero1")],
        alternatives=(
            (
                "comm = self.grid.world if self.sync.zero else self.grid.mp_comm",
                "comm = self.grid.mp_comm",
            ),
        ),
    ),
    M(
        "zero-piece-equal-length",
        DPAR,
        "pieces = [(a + sum(c[:r]), a + sum(c[:r + 1])) for (a, _), c in zip(self.buckets, self.counts)]",
        "pieces = [(a + sum(c[:r]), a + sum(c[:r]) + c[0]) for (a, _), c in zip(self.buckets, self.counts)]",
        "ZeRO-1 ownership assumes equal pieces (c[0] for c[r]): ranks past n % dp own one element of the next rank",
        [T_OPTIM, par_layout("DP2-zero1"), par_layout("DP4-zero1")],
        alternatives=(
            (
                "(a + sum(c[:r]), a + sum(c[: r + 1]))",
                "(a + sum(c[:r]), a + sum(c[:r]) + c[0])",
            ),
        ),
    ),
    M(
        "zero-params-not-gathered",
        TRAIN,
        "self.sync.gather(self.model.flat)",
        "pass",
        "ZeRO-1: the updated parameter shards are not allgathered after the step",
        [T_OPTIM, par_layout("DP2-zero1")],
    ),
    M(
        "dp-loss-not-averaged",
        TRAIN,
        "loss = self.grid.dp_comm.allreduce_scalar(loss) / dp",
        "loss = self.grid.dp_comm.allreduce_scalar(loss)",
        "the reported loss is the sum over data-parallel ranks, not their mean",
        [par_layout("DP2-zero0")],
        alternatives=(
            (
                "loss = self.grid.world.allreduce_scalar(loss + (0.0 if math.isfinite(norm) else math.nan)) / dp",
                "loss = self.grid.world.allreduce_scalar(loss + (0.0 if math.isfinite(norm) else math.nan))",
            ),
        ),
    ),
    # -- checkpoints: write and restore ------------------------------------------------------------------------------
    M(
        "restore-moments-swapped",
        TSTATE,
        'group = f"optimizer/{slot}"',
        "group = f\"optimizer/{'v' if slot == 'm' else 'm'}\"",
        "resume reads the saved v into m and m into v",
        [*T_TRAIN_RESUME],
    ),
    M(
        "restore-adam-t-dropped",
        TSTATE,
        'tr.opt.t = st["adam_t"]',
        "pass",
        "resume does not restore Adam's step counter (bias corrections restart at t = 1)",
        [*T_TRAIN_RESUME],
    ),
    M(
        "restore-step-dropped",
        TSTATE,
        'tr.step = st["step"]',
        "pass",
        "resume does not restore the step (batches, dropout masks and the lr schedule restart from 0)",
        [*T_TRAIN_RESUME],
    ),
    M(
        "save-v-written-as-m",
        TSTATE,
        "buf = getattr(tr.opt, slot)",
        "buf = tr.opt.m",
        "save (without ZeRO-1) writes the first moment into both optimizer slots",
        [*T_TRAIN_RESUME],
    ),
    M(
        "restore-shard-last-row-floored",
        GPT,
        "r0, r1 = lo // row, -(-hi // row)",
        "r0, r1 = lo // row, hi // row",
        "restore of a shard range: the last, partly covered row is not read (floor instead of ceil)",
        [T_PAR_RESUME, T_RESUME_LAYOUTS],
        alternatives=(
            (SHARD_IO, "r0, r1 = lo // row, -(-hi // row)", "r0, r1 = lo // row, hi // row"),
        ),
    ),
    M(
        "ckpt-read-ignores-hyperslab",
        CKPT,
        "dset.read_direct(out, source_sel=index or None)",
        "dset.read_direct(out)",
        "CheckpointFile.read into a buffer ignores the hyperslab (reads from the dataset's start)",
        [*T_TRAIN_RESUME, T_PAR_RESUME, T_RESUME_LAYOUTS],
    ),
    M(
        "ckpt-verify-share-inverted",
        CKPT,
        "if who == part}",
        "if who != part}",
        "checkpoint verification: each rank checks the datasets of the other ranks' shares (alone: none at all)",
        [T_CKPT],
    ),
    # -- sampling, generation and batches ----------------------------------------------------------------------------
    M(
        "sample-temperature-multiplies",
        GEN,
        "z = z / temperature",
        "z = z * temperature",
        "sampling multiplies the logits by the temperature (equivalent at temperature 1)",
        [T_GEN, T_CLI_GENERATE],
    ),
    M(
        "top-k-excludes-kth",
        GEN,
        "z = np.where(z >= _top_k_threshold(z, k, comm)[:, None], z, -np.inf)",
        "z = np.where(z > _top_k_threshold(z, k, comm)[:, None], z, -np.inf)",
        "top-k keeps the k-1 largest logits (the k-th itself is masked; top_k=1 masks everything)",
        [T_GEN],
    ),
    M(
        "window-restart-precedence",
        GEN,
        "np.asarray(out[r][-(T // 2):])",
        "np.asarray(out[r][-T // 2:])",
        "window restart keeps -T // 2 = ceil(T/2) tokens (operator precedence; equivalent for even block_size)",
        [T_GEN],
        alternatives=(("np.asarray(out[r][-(T // 2) :])", "np.asarray(out[r][-T // 2 :])"),),
    ),
    M(
        "prompt-head-not-tail",
        GEN,
        "logits = _prefill(model, cache, [p[-T:] for p in prompts])",
        "logits = _prefill(model, cache, [p[:T] for p in prompts])",
        "a prompt longer than block_size is cut to its first block_size tokens instead of its last",
        [T_GEN],
    ),
    # -- inference: per-row positions of the KV cache, sampling over vocabulary shards, the cache pool, eval dp ---
    M(
        "cached-attn-row-query-pos-off-by-one",
        LAYERS,
        "qpos = xp.asarray(pos)[:, None] + xp.arange(Tn)[None, :]",
        "qpos = xp.asarray(pos)[:, None] + xp.arange(Tn)[None, :] + 1",
        "per-row cached attention: each query also sees the key one position after its own (padding or stale)",
        [
            inf_test("test_cache_rows_have_their_own_lengths"),
            inf_test("test_batched_prompts_equal_unbatched"),
        ],
    ),
    M(
        "vocab-emb-row-pos-off-by-one",
        TPAR,
        "positions = wpe[xp.asarray(pos0)[:, None] + xp.arange(idx.shape[1])[None, :]]",
        "positions = wpe[xp.asarray(pos0)[:, None] + 1 + xp.arange(idx.shape[1])[None, :]]",
        "per-row embedding: row b's new tokens get the position embeddings from pos0[b] + 1",
        [
            inf_test("test_cache_rows_have_their_own_lengths"),
            inf_test("test_batched_prompts_equal_unbatched"),
        ],
    ),
    M(
        "top-p-shard-prefix-inclusive",
        GEN,
        "before = np.cumsum(ps, axis=1) - ps",
        "before = np.cumsum(ps, axis=1)",
        "top-p candidates: a shard stops before the entry whose mass reaches top_p (the nucleus boundary is lost)",
        [
            inf_test("test_top_p_set_equals_reference"),
            inf_test("test_sharded_candidates_equal_full_vocabulary"),
        ],
    ),
    M(
        "inverse-cdf-owner-one-rank-late",
        GEN,
        "owner = (cum <= target[None, :]).sum(axis=0)",
        "owner = (cum - mass <= target[None, :]).sum(axis=0)",
        "inverse CDF over shards: the owner is the first rank whose mass *before* it passes u (one rank too far)",
        [inf_test("test_tp_generation_equals_single_process")],
    ),
    M(
        "greedy-ties-last-rank",
        GEN,
        "best = every[:, :, 0].argmax(axis=0)",
        "best = every.shape[0] - 1 - every[::-1, :, 0].argmax(axis=0)",
        "sharded greedy: a tie across shards goes to the last rank (not the lowest index, as argmax on the row)",
        [
            inf_test("test_greedy_ties_take_the_lowest_index"),
            inf_test("test_sharded_candidates_equal_full_vocabulary"),
        ],
    ),
    M(
        "greedy-ties-last-in-shard",
        GEN,
        "a = z.argmax(axis=1)",
        "a = z.shape[1] - 1 - z[:, ::-1].argmax(axis=1)",
        "greedy: a tie within a shard goes to the highest index",
        [
            inf_test("test_greedy_ties_take_the_lowest_index"),
            inf_test("test_sharded_candidates_equal_full_vocabulary"),
        ],
    ),
    M(
        "kv-pool-exact-size-only",
        GPT,
        "if free is not None and free.size < size:",
        "if free is not None and free.size != size:",
        "KV-cache pool: a larger pooled buffer is dropped instead of serving a smaller batch",
        [inf_test("test_kv_pool_holds_one_buffer")],
        alternatives=(
            (
                KV_CACHE,
                "if free is not None and free.size < size:",
                "if free is not None and free.size != size:",
            ),
        ),
    ),
    M(
        "eval-dp-not-reduced",
        EVAL,
        'sums = dp_comm.allreduce_(np.array([total, count, n_windows], dtype=np.float64), op="sum")',
        "sums = np.array([total, count, n_windows], dtype=np.float64)",
        "eval under data parallelism: each replica reports its own batches' loss (no sum over the dp group)",
        [inf_test("test_dp_eval_equals_single_process")],
    ),
    M(
        "batch-targets-not-shifted",
        DATA,
        "return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])",
        "return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, :-1])",
        "get_batch returns the inputs as targets (no shift by one)",
        [T_DATA, "tests/test_train.py::test_loss_falls"],
    ),
    M(
        "batch-offset-high-off-by-one",
        DATA,
        "offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)",
        "offsets = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)",
        "get_batch never draws the last window of the split (exclusive bound off by one)",
        [T_DATA],
    ),
]


# ---------------------------------------------------------------------------------------------------------------------
# Processes


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill what this campaign started for one run: the process group it created (start_new_session: the group id is
    the child's pid), and, by pid, any descendant that left the group (mpiexec's daemons may)."""
    descendants = []
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:
        try:
            child.kill()
        except Exception:
            pass


STOP = threading.Event()  # set on Ctrl-C / SIGTERM: no new runs start, the running ones are killed
_RUNNING: set = set()
_RUNNING_LOCK = threading.Lock()


def run_command(
    cmd: list[str], cwd: Path | str, env: dict, timeout: float
) -> tuple[int, str, float, bool]:
    """(return code, stdout+stderr, seconds, timed out)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        return _wait(proc, timeout, t0)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)


def kill_running() -> None:
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        _kill_tree(proc)


def run_all(fn, items, jobs: int) -> list:
    """[fn(item)] on `jobs` threads, in order; on Ctrl-C/SIGTERM: no new item starts, the running commands are
    killed, and KeyboardInterrupt propagates."""
    ex = ThreadPoolExecutor(jobs)
    try:
        futures = [ex.submit(fn, item) for item in items]
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        STOP.set()
        ex.shutdown(wait=False, cancel_futures=True)
        kill_running()
        raise
    finally:
        ex.shutdown(wait=True)


def _wait(proc: subprocess.Popen, timeout: float, t0: float) -> tuple[int, str, float, bool]:
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the command itself may have finished while a leftover grandchild keeps the pipe open
        timed_out = proc.poll() is None
        _kill_tree(proc)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = b""
    else:
        if proc.returncode != 0:
            _kill_tree(proc)  # nothing of a failed run (an aborted mpiexec job) may linger
    return proc.returncode, out.decode("utf-8", "replace"), time.monotonic() - t0, timed_out


def test_env(venv: Path, copy: Path) -> dict:
    """scripts/test.sh's environment, with PYTHONPATH = the copy."""
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        OPAL_PREFIX=str(venv),
        PMIX_PREFIX=str(venv),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [str(copy), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    # a rank stuck in a collective (a mutant can cause one) fails its test in two minutes, not the conftest's 150 s
    # (tighter would fail healthy tests when the machine is shared: they take 2-3 s unloaded)
    env.setdefault("HPC_LLM_MPI_TIMEOUT", "120")
    env.setdefault("HPC_LLM_MPI_PARENT_TIMEOUT", "160")
    return env


# ---------------------------------------------------------------------------------------------------------------------
# The copy of the repository


def git(repo: Path, *args: str, text: bool = True):
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=text
    ).stdout


def make_copy(repo: Path, dest: Path, rev: str | None, overlays: list[str]) -> list[str]:
    """Copy the repository's files into dest; returns warnings."""
    warnings = []
    dest.mkdir(parents=True)
    if rev is None:
        names = git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split(
            "\0"
        )
        for name in filter(None, names):
            src = repo / name
            if not src.exists() and not src.is_symlink():  # tracked but deleted in the working tree
                warnings.append(
                    f"{name}: listed by git but missing from the working tree, not copied"
                )
                continue
            if (
                src.is_dir() and not src.is_symlink()
            ):  # a submodule or nested repository: its files are not listed
                warnings.append(f"{name}: a nested repository, not copied")
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)
    else:
        archive = dest.parent / f"{dest.name}.tar"
        with open(archive, "wb") as f:
            subprocess.run(["git", "archive", "--format=tar", rev], cwd=repo, check=True, stdout=f)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="tar") if hasattr(
                tarfile, "tar_filter"
            ) else tar.extractall(dest)
        archive.unlink()
    for name in overlays:
        src = repo / name
        if not src.is_file():
            warnings.append(f"--overlay {name}: not a file in the working tree, not copied")
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return warnings


def check_outside(path: Path, repo: Path) -> None:
    p, r = path.resolve(), repo.resolve()
    if p == r or r in p.parents:
        raise SystemExit(f"refusing to work inside the repository: {p}")


CANARY_TEST = r'''
"""Written by scripts/mutation_campaign.py into its copy of the repository only: every way the tests run code (this
pytest process, `python -m hpc_llm` subprocesses, mpiexec ranks, mpi-pytest ranks) imports the copy's hpc_llm."""
import os
import shutil
import subprocess
import sys

import pytest

import hpc_llm

ROOT = os.path.realpath(os.environ["HPC_LLM_MUTATION_COPY"])
TOKEN = os.environ["HPC_LLM_MUTATION_TOKEN"]
PRINT = {**os.environ, "HPC_LLM_MUTATION_CANARY_PRINT": "1"}


def inside(path):
    return os.path.realpath(path).startswith(ROOT + os.sep)


def canary_lines(text):
    return [line.split(" ", 2) for line in text.splitlines() if line.startswith("MUTATION-CANARY ")]


def test_pytest_process_imports_the_copy():
    assert inside(hpc_llm.__file__), hpc_llm.__file__
    assert getattr(hpc_llm, "MUTATION_CANARY", None) == TOKEN


def test_python_m_hpc_llm_subprocess_imports_the_copy(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc_llm", "--help"], cwd=tmp_path, env=PRINT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = canary_lines(proc.stderr)
    assert len(lines) == 1 and lines[0][1] == TOKEN and inside(lines[0][2]), proc.stderr


def test_mpiexec_ranks_import_the_copy(tmp_path):
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not on PATH"
    proc = subprocess.run([mpiexec, "--oversubscribe", "-n", "2", sys.executable, "-m", "hpc_llm", "--help"],
                          cwd=tmp_path, env=PRINT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = canary_lines(proc.stderr + proc.stdout)
    assert len(lines) == 2 and all(l[1] == TOKEN and inside(l[2]) for l in lines), proc.stdout + proc.stderr


@pytest.mark.parallel(nprocs=2)
def test_mpi_pytest_ranks_import_the_copy():
    from mpi4py import MPI

    seen = MPI.COMM_WORLD.allgather((hpc_llm.__file__, getattr(hpc_llm, "MUTATION_CANARY", None)))
    assert len(seen) == 2 and all(inside(f) and t == TOKEN for f, t in seen), seen
'''

CANARY_INIT = """

# --- written by scripts/mutation_campaign.py into its copy only (the import canary), removed after the check ---
MUTATION_CANARY = "{token}"
import os as _mc_os, sys as _mc_sys  # noqa: E401,E402
if _mc_os.environ.get("HPC_LLM_MUTATION_CANARY_PRINT"):
    print("MUTATION-CANARY", MUTATION_CANARY, __file__, file=_mc_sys.stderr, flush=True)
"""


def sanity_check(python: str, copy: Path, env: dict) -> None:
    """Abort unless the copy is what the tests import, in every kind of process they start."""
    rc, out, _, _ = run_command(
        [python, "-c", "import hpc_llm; print(hpc_llm.__file__)"], "/", env, 120
    )
    where = out.strip().splitlines()[-1] if out.strip() else ""
    log(f"sanity: `import hpc_llm` (cwd /, PYTHONPATH={copy}) -> {where}")
    if rc != 0 or not os.path.realpath(where).startswith(os.path.realpath(copy) + os.sep):
        raise SystemExit(f"ABORT: hpc_llm is not imported from the copy {copy}:\n{out}")
    init = copy / "hpc_llm" / "__init__.py"
    original = init.read_bytes()
    token = uuid.uuid4().hex
    canary = copy / "tests" / "test_zz_mutation_canary.py"
    try:
        init.write_bytes(original + CANARY_INIT.format(token=token).encode())
        canary.write_text(CANARY_TEST)
        cenv = {**env, "HPC_LLM_MUTATION_COPY": str(copy), "HPC_LLM_MUTATION_TOKEN": token}
        rc, out, secs, _ = run_command(
            [python, "-m", "pytest", *PYTEST_ARGS, str(canary.relative_to(copy))], copy, cenv, 300
        )
    finally:
        init.write_bytes(original)
        canary.unlink(missing_ok=True)
    if rc != 0 or not re.search(r"\b4 passed\b", out):
        raise SystemExit(
            f"ABORT: the import canary failed (the tests would not run the mutated copy):\n{out}"
        )
    log(
        f"sanity: canary seen by the pytest process, `python -m hpc_llm`, mpiexec ranks and mpi-pytest ranks "
        f"({secs:.1f} s)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Running a selection


def selection_args(tests: tuple[str, ...], k: str | None) -> list[str]:
    return [*tests, *(["-k", k] if k else [])]


def selection_label(tests: tuple[str, ...], k: str | None) -> str:
    return " ".join(tests) + (f" -k '{k}'" if k else "")


def parse_counts(out: str) -> dict:
    counts = {}
    for line in reversed(out.strip().splitlines()):
        found = re.findall(
            r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b", line
        )
        if found and re.search(r"\bin [\d.]+s\b", line):
            for n, what in found:
                counts["error" if what.startswith("error") else what] = int(n)
            break
    return counts


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def hung_at(out: str) -> str:
    """Where pytest-timeout's stack dump shows the hung code: its last frame in hpc_llm, if any."""
    dump = out[: out.rfind("+ Timeout +")] if "+ Timeout +" in out else ""
    frames = [
        f
        for f in re.findall(r'File "[^"]*/(hpc_llm/[^"]+)", line (\d+), in (\w+)', dump)
        if not f[2].startswith("_")
    ]  # not the private helpers under the public call (Comm._timed)
    return f", hung in {frames[-1][2]} at {frames[-1][0]}:{frames[-1][1]}" if frames else ""


def classify(rc: int, out: str, timed_out: bool) -> tuple[str, str]:
    """(result, detail): killed / survived / timeout / error / no-tests."""
    counts = parse_counts(out)
    summary = ", ".join(f"{n} {w}" for w, n in counts.items())
    if timed_out:
        return "timeout", summary
    if rc == 0:
        return (
            ("survived", summary)
            if counts.get("passed", 0) > 0
            else ("no-tests", summary or "nothing ran")
        )
    if rc == 1:
        failed = first_failure(out)
        if "+ Timeout +" in out or re.search(
            r"Failed: Timeout \(>[\d.]+s\) from pytest-timeout", out
        ):
            # pytest-timeout fired, in this process or in an MPI rank (its stack dump): a test hung (a mutant can
            # deadlock the ranks) or the machine is overloaded; not a clean kill
            return "timeout", f"pytest-timeout in {failed or 'a test'}{hung_at(out)} ({summary})"
        return "killed", (f"{failed} ({summary})" if failed else summary)
    what = {
        2: "interrupted (collection error?)",
        3: "pytest internal error",
        4: "pytest usage error",
        5: "no tests collected",
    }.get(rc, f"exit status {rc}")
    errline = next((line for line in out.splitlines() if line.startswith(("ERROR", "E "))), "")
    return "error", f"{what}{': ' + errline.strip() if errline else ''}"


def tail(out: str, n: int = 40) -> str:
    return "\n".join(out.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_line(results: list[dict]) -> str:
    def ids(kind):
        return [r["id"] for r in results if r["result"] == kind]

    n = len(results)
    killed, survived = ids("killed"), ids("survived")
    line = f"killed {len(killed)} / {n}, survived {len(survived)}: {', '.join(survived) or '-'}"
    for kind in ("timeout", "error", "stale", "invalid", "no-tests"):
        if ids(kind):
            line += f"; {kind} {len(ids(kind))}: {', '.join(ids(kind))}"
    return line


def render_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Mutation campaign",
        "",
        f"Source: {meta['source']}; python {meta['python']}; started {meta['started']}; "
        f"total {meta.get('total_seconds', 0):.0f} s ({meta.get('baseline_seconds', 0):.0f} s baseline of "
        f"{meta.get('baseline_selections', 0)} selections).",
        "",
        f"**{summary_line(results)}**",
        "",
        "| id | file | description | tests run | result | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        tests = selection_label(tuple(r["tests"]), r["k"])
        if r["missing_tests"]:
            tests += f" (missing, skipped: {' '.join(r['missing_tests'])})"
        result = r["result"] + (f": {r['detail']}" if r["detail"] else "")
        lines.append(
            f"| {md_escape(r['id'])} | {md_escape(r['file'])} | {md_escape(r['description'])} | "
            f"{md_escape(tests)} | {md_escape(result)} | {r['seconds']:.1f} |"
        )
    if meta.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {md_escape(w)}" for w in meta["warnings"]]
    return "\n".join(lines) + "\n"


class Report:
    def __init__(self, md_path: Path, json_path: Path, meta: dict):
        self.md_path, self.json_path, self.meta = md_path, json_path, meta
        self.results: dict[str, dict] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()

    def add(self, result: dict) -> None:
        with self.lock:
            self.results[result["id"]] = result
            self.write()

    def ordered(self) -> list[dict]:
        return [self.results[i] for i in self.order if i in self.results]

    def write(self) -> None:
        results = self.ordered()
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        self.md_path.write_text(render_markdown(results, self.meta))
        self.json_path.write_text(
            json.dumps(
                {**self.meta, "summary": summary_line(results), "mutants": results}, indent=2
            )
            + "\n"
        )


# ---------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--list", action="store_true", help="list the mutants, checked against the source, and exit"
    )
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument(
        "--python", default=DEFAULT_PYTHON, help=f"the venv's python (default {DEFAULT_PYTHON})"
    )
    ap.add_argument("--out", default="/tmp/mutation_results.md", help="Markdown results file")
    ap.add_argument("--json", default=None, help="JSON results file (default: --out with .json)")
    ap.add_argument(
        "--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)"
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="cap on a mutant's timeout in seconds (default 600; the timeout itself is "
        "max(4 x its selection's baseline + 60, the MPI tests' parent timeout + 60))",
    )
    ap.add_argument(
        "--rev",
        default=None,
        help="copy the tree of this commit (git archive) instead of the working tree",
    )
    ap.add_argument(
        "--overlay",
        action="append",
        default=[],
        help="with --rev: a working-tree file copied over the commit's tree (repeatable)",
    )
    ap.add_argument(
        "--tmpdir", default=None, help="where the copies go (default: the system's temp dir)"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the copies (for a look at a mutant's run)"
    )
    return ap.parse_args(argv)


def source_text(repo: Path, rev: str | None, overlays: list[str], file: str) -> str | None:
    try:
        if rev is None or file in overlays:
            return (repo / file).read_text()
        return git(repo, "show", f"{rev}:{file}")
    except (OSError, subprocess.CalledProcessError):
        return None


def list_mutants(repo: Path, mutants: list[Mutant], rev: str | None, overlays: list[str]) -> int:
    stale = 0
    print("| id | file | status | description | tests |")
    print("|---|---|---|---|---|")
    for m in mutants:
        file, mutated, why = m.resolve(lambda f: source_text(repo, rev, overlays, f))
        status = "ok" if mutated is not None else why
        stale += status != "ok"
        print(
            f"| {m.id} | {file} | {md_escape(status)} | {md_escape(m.description)} | "
            f"{md_escape(selection_label(m.tests, m.k))} |"
        )
    where = (
        f"commit {rev}" + (f" + {', '.join(overlays)}" if overlays else "")
        if rev
        else "the working tree"
    )
    print(f"\n{len(mutants)} mutants ({len(mutants) - stale} apply to {where}, {stale} stale)")
    return 1 if stale else 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)  # `kill PID` stops a background campaign as Ctrl-C does
    repo = Path(git(SCRIPT_DIR, "rev-parse", "--show-toplevel").strip())
    mutants = MUTANTS
    ids = [m.id for m in MUTANTS]
    assert len(set(ids)) == len(ids), "duplicate mutant ids"
    if args.only:
        wanted = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = [i for i in wanted if i not in ids]
        if unknown:
            raise SystemExit(f"--only: unknown mutant ids {unknown} (see --list)")
        mutants = [m for m in MUTANTS if m.id in wanted]
    if args.overlay and not args.rev:
        raise SystemExit("--overlay needs --rev (without it the working tree is copied whole)")
    if args.list:
        return list_mutants(repo, mutants, args.rev, args.overlay)
    if args.jobs < 1:
        raise SystemExit("--jobs: expected a positive integer")

    python = str(Path(args.python).absolute())
    venv = Path(
        python
    ).parent.parent  # not resolved: the venv's python is a symlink to the system's
    if not Path(python).exists():
        raise SystemExit(f"--python {python}: not found")
    md_path = Path(args.out)
    json_path = Path(args.json) if args.json else md_path.with_suffix(".json")
    t_start = time.monotonic()
    head = git(repo, "rev-parse", "--short", args.rev or "HEAD").strip()
    if args.rev:
        source = f"commit {args.rev} ({head}) of {repo}" + (
            f" + working-tree {', '.join(args.overlay)}" if args.overlay else ""
        )
    else:
        dirty = bool(git(repo, "status", "--porcelain").strip())
        source = f"working tree of {repo} at {head}" + (
            " with uncommitted changes" if dirty else ""
        )
    meta = {
        "source": source,
        "python": python,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "warnings": [],
    }
    warnings = meta["warnings"]

    root = Path(tempfile.mkdtemp(prefix="mutation_campaign-", dir=args.tmpdir))
    check_outside(root, repo)
    copies = [root / f"copy-{i}" for i in range(args.jobs)]
    log(f"copying {source} into {root} ({args.jobs} cop{'y' if args.jobs == 1 else 'ies'})")
    try:
        warnings += make_copy(repo, copies[0], args.rev, args.overlay)
        for c in copies[1:]:
            shutil.copytree(copies[0], c, symlinks=True)
        for w in warnings:
            log(f"WARNING: {w}")
        envs = {c: test_env(venv, c) for c in copies}
        for c in copies:
            sanity_check(python, c, envs[c])
        return campaign(
            args, mutants, copies, envs, python, meta, md_path, json_path, t_start, repo
        )
    except KeyboardInterrupt:
        kill_running()
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"copies kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def campaign(args, mutants, copies, envs, python, meta, md_path, json_path, t_start, repo) -> int:
    warnings = meta["warnings"]
    base = copies[0]
    # -- plan: each mutant's selection (missing test files skipped, visibly) and pristine source
    plan = {}
    for m in mutants:
        present = tuple(t for t in m.tests if (base / t.split("::")[0]).is_file())
        missing = [t for t in m.tests if t not in present]
        for t in missing:
            w = f"{m.id}: {t.split('::')[0]} does not exist in the copy, skipped from its selection"
            warnings.append(w)
            log(f"WARNING: {w}")
        plan[m.id] = (present, missing)
    selections = sorted({(plan[m.id][0], m.k) for m in mutants if plan[m.id][0]})

    pool_copies: queue.Queue = queue.Queue()
    for c in copies:
        pool_copies.put(c)

    def pytest_cmd(copy: Path, tests, k) -> list[str]:
        return [
            python,
            "-m",
            "pytest",
            *PYTEST_ARGS,
            f"--basetemp={copy.parent / (copy.name + '-tmp')}",
            *selection_args(tests, k),
        ]

    # -- baseline: every selection green on the unmutated copy
    log(f"baseline: {len(selections)} selections")
    t_base = time.monotonic()
    baseline = {}

    def run_baseline(sel):
        copy = pool_copies.get()
        try:
            rc, out, secs, timed_out = run_command(
                pytest_cmd(copy, *sel), copy, envs[copy], max(args.timeout, 600)
            )
        finally:
            pool_copies.put(copy)
        result, detail = classify(rc, out, timed_out)
        log(f"  baseline {result:8s} {secs:6.1f} s  {selection_label(*sel)}  [{detail}]")
        if (
            result != "survived"
        ):  # once more before aborting: a test can time out on a machine shared with others
            copy = pool_copies.get()
            try:
                rc, out, secs, timed_out = run_command(
                    pytest_cmd(copy, *sel), copy, envs[copy], max(args.timeout, 600)
                )
            finally:
                pool_copies.put(copy)
            first = f"{result} ({detail})"
            result, detail = classify(rc, out, timed_out)
            log(
                f"  baseline {result:8s} {secs:6.1f} s  {selection_label(*sel)}  [{detail}] (rerun)"
            )
            if result == "survived":
                warnings.append(
                    f"baseline of `{selection_label(*sel)}` was {first} at first and green when run "
                    f"again: flaky on this machine"
                )
        return sel, result, detail, secs, out

    for sel, result, detail, secs, out in run_all(run_baseline, selections, args.jobs):
        baseline[sel] = (result, detail, secs, out)
    red = [(sel, v) for sel, v in baseline.items() if v[0] != "survived"]
    meta["baseline_seconds"] = time.monotonic() - t_base
    meta["baseline_selections"] = len(selections)
    meta["baseline"] = [
        {"tests": list(sel[0]), "k": sel[1], "result": v[0], "detail": v[1], "seconds": v[2]}
        for sel, v in baseline.items()
    ]
    if red:
        for sel, (result, detail, _secs, out) in red:
            log(
                f"\nABORT: the unmutated baseline of `{selection_label(*sel)}` is {result} ({detail}); every mutant "
                f"would look killed. Its output:\n{tail(out, 60)}"
            )
        return 2

    # -- the mutants
    report = Report(md_path, json_path, meta)
    report.order = [m.id for m in mutants]
    done = [0]
    done_lock = threading.Lock()

    def run_mutant(m: Mutant) -> dict:
        present, missing = plan[m.id]
        record = {
            "id": m.id,
            "file": m.file,
            "description": m.description,
            "tests": list(present),
            "k": m.k,
            "missing_tests": missing,
            "result": "",
            "detail": "",
            "seconds": 0.0,
            "timeout_s": None,
            "returncode": None,
            "output_tail": "",
        }
        if STOP.is_set():
            return record
        copy = pool_copies.get()
        try:

            def read(file):
                return (copy / file).read_text() if (copy / file).is_file() else None

            file, mutated, why = m.resolve(read)
            record["file"] = file
            if mutated is None:
                record.update(result="stale", detail=why)
                return record
            path = copy / file
            check_outside(path, repo)
            original = path.read_bytes()
            try:
                compile(mutated, str(path), "exec")
            except SyntaxError as e:
                record.update(result="invalid", detail=f"the mutated file does not compile: {e}")
                return record
            if not present:
                record.update(result="no-tests", detail="none of its test files exist")
                return record
            base_secs = baseline[(present, m.k)][2]
            # long enough for conftest's MPI timeouts to fire first: a hung rank then fails its test with the
            # ranks' stacks in the output (reported as a timeout) instead of being killed without a word
            mpi_parent = float(envs[copy].get("HPC_LLM_MPI_PARENT_TIMEOUT", "200"))
            timeout = m.timeout or min(args.timeout, max(60.0, 4 * base_secs + 60, mpi_parent + 60))
            try:
                path.write_text(mutated)
                rc, out, secs, timed_out = run_command(
                    pytest_cmd(copy, present, m.k), copy, envs[copy], timeout
                )
            finally:
                path.write_bytes(original)
            if STOP.is_set():
                record.update(result="interrupted", seconds=round(secs, 2))
                return record
            if path.read_bytes() != original:
                raise SystemExit(f"ABORT: could not restore {path}")
            result, detail = classify(rc, out, timed_out)
            record.update(
                result=result,
                detail=detail,
                seconds=round(secs, 2),
                timeout_s=timeout,
                returncode=rc,
                output_tail="" if result == "survived" else tail(out),
            )
            return record
        finally:
            pool_copies.put(copy)
            if record["result"] not in (
                "",
                "interrupted",
            ):  # not run, or killed by the stop: not a result
                with done_lock:
                    done[0] += 1
                    n = done[0]
                log(
                    f"[{n:2d}/{len(mutants)}] {m.id:36s} {record['result']:8s} {record['seconds']:6.1f} s  "
                    f"{record['detail']}"
                )
                report.add(record)

    log(f"mutants: {len(mutants)}")
    try:
        run_all(run_mutant, mutants, args.jobs)
    except KeyboardInterrupt:
        meta["total_seconds"] = time.monotonic() - t_start
        meta["warnings"].append("interrupted: the results are partial")
        report.write()
        log(f"interrupted; partial results in {md_path}, {json_path}")
        return 130

    meta["total_seconds"] = time.monotonic() - t_start
    report.write()
    results = report.ordered()
    sys.stdout.write(render_markdown(results, meta))
    print(f"\n{summary_line(results)}")
    log(f"results: {md_path}, {json_path} ({meta['total_seconds']:.0f} s)")
    bad = [r for r in results if r["result"] in ("stale", "invalid", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
