"""The mutants of scripts/dev/mutation_campaign.py: one-line slips a careful engineer could make (a data table).

A mutant names the function it mutates by its qualified name ("layernorm_backward", "AdamW.step": a module-level
function or a method, found by parsing every hpc_llm/**/*.py, so it follows the function when code moves between
files; "layers.embedding_backward", with its module's name, where two modules define the name), a snippet of that
function's source that must occur exactly once in it, and the replacement. Its tests are test files by basename,
optionally with a node id ("test_parallel.py::test_exact_resume_dp2_zero1"), found anywhere under tests/. After a change
to the code a mutant mutates, `--list` shows which snippets no longer apply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    # qualified name: "name" (module level), "Class.name", or "module.name" if ambiguous
    function: str
    original: str  # must occur exactly once in the function's source
    replacement: str
    description: str
    tests: tuple[str, ...]  # "test_file.py" or "test_file.py::node id", found under tests/
    k: str | None = None  # pytest -k expression
    timeout: float | None = None  # seconds; default: from the baseline's duration


T_GRAD, T_GEN, T_TRAIN = "test_gradients.py", "test_generate.py", "test_train.py"
T_OPTIM, T_DATA, T_CKPT = "test_optim.py", "test_data.py", "test_checkpoint.py"
T_GPT2_LOGITS = "test_gpt2_import.py::test_logits_equal_reference"
# a committed transformers fixture
HF_LOGITS = "test_gpt2_import.py::test_logits_match_transformers"
HF_GRADS = "test_gpt2_import.py::test_loss_and_gradients_match_transformers"
T_TRAIN_RESUME = (
    "test_train.py::test_exact_resume",
    "test_train.py::test_resume_auto_takes_newest_and_empty_dir_starts_fresh",
)
T_PAR_RESUME = "test_parallel.py::test_exact_resume_dp2_zero1"
T_RESUME_LAYOUTS = "test_resume_layouts.py"
T_CLI_GENERATE = "test_cli.py::test_generate_from_checkpoint"

F16_SCALER = "test_precision.py::test_loss_scaler_equals_megatrons_state_machine"
F16_POWERSGD = (
    "test_compression_fp16.py::test_powersgd_fp16_through_a_loss_scale_change_equals_float64"
)
F16_WIRE = "test_compression_fp16.py::test_fp16_wire_at_the_top_of_its_range"
F16_STEP = "test_optim.py::test_fp16_step_equals_float64_on_the_unscaled_gradients"
T_PREC, T_RECOMPUTE = "test_precision.py", "test_recompute.py"
INT8_TESTS = "test_inference.py::test_int8_scales_and_dequantization"
SHARDED = "test_inference.py::test_sharded_candidates_equal_full_vocabulary"


def inf_test(name: str) -> str:
    return f"test_inference.py::{name}"


def tp_test(name: str) -> str:
    return f"test_tensor_parallel.py::{name}"


def par_layout(layout: str) -> str:
    """One layout of test_parallel's end-to-end comparison with the single process (e.g. "DP2-zero1")."""
    return f"test_parallel.py::test_training_matches_single_process[{layout}]"


MUTANTS: list[Mutant] = [
    # -- layers: layernorm, gelu, attention / softmax / causal mask, linear, embedding backward, dropout -------------
    Mutant(
        "ln-unbiased-var",
        "_twin_statistics",
        "var *= 1.0 / x.shape[-1]",
        "var *= 1.0 / (x.shape[-1] - 1)",
        "LayerNorm forward normalises by the unbiased variance (divides by C-1, torch.var's default)",
        (T_GRAD, T_GPT2_LOGITS, HF_LOGITS),
    ),
    Mutant(
        "ln-bwd-mean-without-gain",
        "layernorm_backward_input_numpy",
        "mean_d = dxhat.mean(axis=-1, keepdims=True)",
        "mean_d = dout.mean(axis=-1, keepdims=True)",
        "LayerNorm backward subtracts the mean of dout instead of dout*w (the gain left out of one term)",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "ln-dw-accumulate-overwrites",
        "layernorm_backward_weight",
        "column_sums_into(d2, dw, accumulate, x2)",
        "column_sums_into(d2, dw, False, x2)",
        "LayerNorm gain gradient overwritten on accumulate=True (micro-batches after the first lose the earlier ones)",
        (T_GRAD,),
    ),
    Mutant(
        "gelu-fwd-cubic-without-c",
        "_gelu_tanh",
        "ts *= GELU_C * 0.044715",
        "ts *= 0.044715",
        "GELU forward (and selective recompute's tanh): tanh(c x + 0.044715 x^3) instead of tanh(c (x + 0.044715 x^3))",
        (T_GRAD, T_GPT2_LOGITS, HF_LOGITS),
    ),
    Mutant(
        "gelu-bwd-missing-3",
        "gelu_backward_numpy",
        "ins *= 0.5 * 3 * 0.044715 * GELU_C",
        "ins *= 0.5 * 0.044715 * GELU_C",
        "GELU backward: d/dx of x^3 written as x^2 (the factor 3 dropped)",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "causal-mask-no-offset",
        "causal_mask",
        "i = xp.arange(Tq)[:, None] + (Tk - Tq)",
        "i = xp.arange(Tq)[:, None]",
        "causal mask assumes queries start at position 0 (wrong for query blocks and for KV-cache decoding)",
        (T_GRAD, T_GEN),
    ),
    Mutant(
        "attn-scale-no-sqrt",
        "attention_forward",
        "prec, held, 1.0 / math.sqrt(hd))",
        "prec, held, 1.0 / hd)",
        "attention scores scaled by 1/hd instead of 1/sqrt(hd) (equivalent only when hd = 1)",
        (T_GRAD, T_GEN, T_GPT2_LOGITS, HF_LOGITS),
    ),
    Mutant(
        "softmax-bwd-rowdot-dropped-probs",
        "softmax_backward_numpy_",
        'rowdot = xp.einsum("...j,...j->...", datt, att)[..., None]',
        'rowdot = xp.einsum("...j,...j->...", datt, '
        "att if keep is None else att * keep * scale)[..., None]",
        "softmax backward's row sum uses the dropped-out probabilities (wrong only with attention dropout)",
        (T_GRAD,),
    ),
    Mutant(
        "attn-bwd-dq-unscaled",
        "attention_backward",
        "scale = 1.0 / math.sqrt(hd)",
        "scale = 1.0",
        "attention backward forgets the 1/sqrt(hd) of the pre-scaled q in dq (equivalent only when hd = 1)",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "linear-dw-ignores-accumulate",
        "linear_backward_weight",
        "matmul(x.reshape(-1, x.shape[-1]).T, b, dw, accumulate, prec)",
        "matmul(x.reshape(-1, x.shape[-1]).T, b, dw, False, prec)",
        "linear backward always overwrites the weight gradient (gradient accumulation keeps the last micro-batch)",
        (T_GRAD,),
    ),
    Mutant(
        "embedding-bwd-fancy-index-add",
        "layers.embedding_backward",
        "xp.add.at(dwte, idx.reshape(-1), dx.reshape(-1, dx.shape[-1]))",
        "dwte[idx.reshape(-1)] += dx.reshape(-1, dx.shape[-1])",
        "token embedding backward with fancy-index += (a token repeated in the batch is counted once)",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "wpe-bwd-zeroes-used-rows",
        "position_embedding_backward",
        "dwpe[T:] = 0",
        "dwpe[:T] = 0",
        "position embedding backward zeroes the rows it then overwrites, leaving stale gradient beyond T",
        (T_GRAD,),
    ),
    Mutant(
        "dropout-scale-keep-prob",
        "dropout_mask",
        "DropoutMask(rng.random(shape, dtype=dtype) >= p, 1.0 / (1.0 - p))",
        "DropoutMask(rng.random(shape, dtype=dtype) >= p, 1.0 - p)",
        "dropout scales kept activations by (1-p) instead of 1/(1-p) (forward and backward consistent; train/eval "
        "mismatch)",
        (T_GRAD, T_TRAIN),
    ),
    Mutant(
        "dropout-rng-heads-slice",
        "DropoutRNG.random",
        "row[...] = gen.random((n, *row.shape[1:]), dtype=dtype)[a:b]",
        "row[...] = gen.random((n, *row.shape[1:]), dtype=dtype)[: b - a]",
        "attention dropout under TP: every rank takes the first heads' masks, not its own heads' (and under "
        "sequence parallelism the first positions' branch masks)",
        (par_layout("TP2-zero0"),),
    ),
    # -- the model: forward/backward wiring, residuals, tied embedding, loss scale, KV cache --------------------------
    Mutant(
        "ln2-bwd-residual-dropped",
        "Block.backward_input",
        "self.ln_2.backward_input(dh2, c.ln_2, work, residual=dx)",
        "dx[...] = self.ln_2.backward_input(dh2, c.ln_2, work)",
        "block backward: the MLP branch's gradient replaces the residual stream's instead of adding to it",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "ln2-forward-uses-ln1-gain",
        "Block.__init__",
        "self.ln_2 = LayerNorm(ln[2], ln[3], prec, partial=sp)",
        "self.ln_2 = LayerNorm(ln[0], ln[3], prec, partial=sp)",
        "ln_2 normalises with ln_1's gain (copy-paste slip; in the modules.py version forward and backward agree, "
        "so only a reference comparison can see it)",
        (T_GRAD, T_GEN, T_GPT2_LOGITS, HF_LOGITS),
    ),
    Mutant(
        "ce-bwd-ignores-loss-scale",
        "Head.backward_input",
        "loss_backward(ce, loss_scale)",
        "loss_backward(ce)",
        "backward ignores loss_scale (the trainer's 1/(grad_accum*dp) averaging is lost)",
        (T_GRAD, HF_GRADS, T_TRAIN, par_layout("DP2-zero0")),
    ),
    Mutant(
        "kv-cache-positions-restart",
        "GPT.forward_cached",
        "x, _ = chunk.embedding.forward(idx, pos0=pos0)",
        "x, _ = chunk.embedding.forward(idx)",
        "KV-cache decoding: each new chunk gets position embeddings from 0 instead of from cache.length",
        (T_GEN,),
    ),
    Mutant(
        "kv-cache-stores-k-as-v",
        "cached_attention_forward",
        "kv[1, :, :, pos0:end] = qkvh[2]",
        "kv[1, :, :, pos0:end] = qkvh[1]",
        "KV cache: the keys are stored in the value slot",
        (T_GEN,),
    ),
    Mutant(
        "qkv-shard-ignores-blocks",
        "_block_rows",
        '_weight(p + "attn.c_attn.weight", (C, 3 * A), std, tp_axis=1, tp_blocks=3),',
        '_weight(p + "attn.c_attn.weight", (C, 3 * A), std, tp_axis=1, tp_blocks=1),',
        "TP sharding of the fused qkv weight is contiguous (tp_blocks=1): a rank gets q and part of k, not its heads",
        (tp_test("test_shard_index_and_full_tensors"), tp_test("test_gpt_equals_single_process")),
    ),
    # -- tensor parallel: f/g backward, vocab-parallel embedding and cross-entropy, gather ---------------------------
    Mutant(
        "tp-f-bwd-no-allreduce",
        "copy_to_tp_region_backward",
        "return comm.allreduce_(dx)",
        "return dx",
        "f (copy_to_tp_region) backward returns the local gradient instead of the sum over the TP group",
        (
            tp_test("test_attention_block"),
            tp_test("test_mlp_block"),
            tp_test("test_gpt_equals_single_process"),
        ),
    ),
    Mutant(
        "tp-g-bwd-allreduces",
        "reduce_from_tp_region_backward",
        '"""g, backward: the gradient of a sum reaches every partial unchanged."""\n    return dx',
        '"""g, backward: the gradient of a sum reaches every partial unchanged."""\n    return comm.allreduce_(dx)',
        "g (reduce_from_tp_region) backward allreduces too: row-parallel inputs get tp times their gradient",
        (
            tp_test("test_attention_block"),
            tp_test("test_mlp_block"),
            tp_test("test_gpt_equals_single_process"),
        ),
    ),
    Mutant(
        "tp-tied-wte-grad-overwritten",
        "vocab_parallel_embedding_backward",
        "return embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate_wte)",
        "return embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate)",
        "tied embedding: the token embedding's backward overwrites the LM head's gradient already in wte's grad",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "tp-vocab-emb-bwd-skips-first-row",
        "vocab_parallel_embedding_backward",
        "mine = (local >= 0) & (local < dwte_local.shape[0])",
        "mine = (local > 0) & (local < dwte_local.shape[0])",
        "vocab-parallel embedding backward drops the first row of each rank's vocabulary slice",
        (tp_test("test_vocab_parallel_embedding"), tp_test("test_gpt_equals_single_process")),
    ),
    Mutant(
        "tp-ce-padding-negative-start",
        "vocab_parallel_cross_entropy_forward",
        "logits[:, max(0, vocab_size - v0) :] = -xp.inf",
        "logits[:, vocab_size - v0 :] = -xp.inf",
        "vocab-parallel CE: a slice that is all padding gets a negative start and masks only its last columns",
        (
            T_GRAD,
            tp_test("test_vocab_parallel_cross_entropy"),
            tp_test("test_gpt_equals_single_process"),
        ),
    ),
    Mutant(
        "tp-ce-target-logit-not-reduced",
        "vocab_parallel_cross_entropy_forward",
        "comm.allreduce_(target_logit)",
        "pass",
        "vocab-parallel CE: the target logit is not summed over the TP group (only its owner knows it)",
        (tp_test("test_vocab_parallel_cross_entropy"), tp_test("test_gpt_equals_single_process")),
    ),
    Mutant(
        "ce-bwd-not-mean",
        "vocab_parallel_cross_entropy_backward",
        "cross_entropy_backward_(probs, local, mine, scale / probs.shape[0])",
        "cross_entropy_backward_(probs, local, mine, scale)",
        "cross-entropy backward forgets the 1/N of the mean over rows",
        (T_GRAD, HF_GRADS),
    ),
    Mutant(
        "tp-gather-no-moveaxis",
        "gather_from_tp_region",
        "return xp.moveaxis(flat, 0, -2).reshape(*x.shape[:-1], comm.size * n)",
        "return flat.reshape(*x.shape[:-1], comm.size * n)",
        "gather_from_tp_region reshapes the (rank, ...) buffer without moving the rank axis next to the last",
        (tp_test("test_gather_from_tp_region"), tp_test("test_gpt_equals_single_process")),
    ),
    # -- the optimizer: AdamW, the lr schedule, the gradient norm ----------------------------------------------------
    Mutant(
        "adam-no-bias-correction-1",
        "AdamW.step",
        '"step": lr * sqrt_bc2 / (1.0 - b1**self.t),',
        '"step": lr * sqrt_bc2,',
        "AdamW without the first moment's bias correction 1/(1-b1^t)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "adam-bc2-no-sqrt",
        "AdamW.step",
        "sqrt_bc2 = math.sqrt(1.0 - b2**self.t)",
        "sqrt_bc2 = 1.0 - b2**self.t",
        "AdamW's second-moment bias correction without the square root",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "adam-eps-uncorrected",
        "AdamW.step",
        '"eps": c.eps * sqrt_bc2,',
        '"eps": c.eps,',
        "AdamW eps added to sqrt(v) before the bias correction (eps/sqrt(bc2) in PyTorch's terms: a small effect, "
        "largest in the first steps)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "adamw-decay-without-lr",
        "AdamW.step",
        '"keep": 1.0 - lr * c.weight_decay,',
        '"keep": 1.0 - c.weight_decay,',
        "decoupled weight decay not scaled by lr (p *= 1 - wd every step)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "adamw-decay-everything",
        "optim._segments",
        "decayed = any(ra <= a and b <= rb for ra, rb in decay_ranges)",
        "decayed = any(ra <= a or b <= rb for ra, rb in decay_ranges)",
        "weight decay also applied to LayerNorm gains and biases (`or` for `and` in the range test)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "adam-m-uses-beta2",
        "adamw_update_numpy",
        "mc *= b1",
        "mc *= b2",
        "AdamW's first moment decays with beta2 (the beta misused)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "adam-clip-once-in-v",
        "AdamW.step",
        '"g2": (1.0 - b2) * grad_scale * grad_scale,',
        '"g2": (1.0 - b2) * grad_scale,',
        "the clip factor folded into v once instead of squared (only matters on clipped steps)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "lr-warmup-from-zero",
        "lr_at",
        "return t.lr * (step + 1) / (t.warmup_iters + 1)",
        "return t.lr * step / t.warmup_iters",
        "warmup starts at lr 0 (step 0 does nothing) and ends at lr, not nanoGPT's (step+1)/(warmup+1)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "lr-cosine-sign",
        "lr_at",
        "return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)",
        "return t.min_lr + 0.5 * (1.0 - math.cos(math.pi * ratio)) * (t.lr - t.min_lr)",
        "cosine schedule upside down: after warmup the lr rises from min_lr to lr",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "lr-cosine-no-floor",
        "lr_at",
        "return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)",
        "return 0.5 * (1.0 + math.cos(math.pi * ratio)) * t.lr",
        "cosine decays to 0 instead of to the min_lr floor (then jumps to min_lr after lr_decay_iters)",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "grad-norm-not-reduced",
        "global_grad_norm",
        "return math.sqrt(comm.allreduce_scalar(local))",
        "return math.sqrt(local)",
        "global gradient norm not summed over the group (each rank clips by its own shard's norm)",
        (T_OPTIM, par_layout("DP2-zero1"), par_layout("TP2-zero0")),
    ),
    # -- gradient sync: 1/dp averaging, grad_accum scale, clipping, ZeRO-1 ownership ---------------------------------
    Mutant(
        "loss-scale-no-dp",
        "Trainer._gradients",
        "scale = loss_scale / (t.grad_accum * dp)",
        "scale = loss_scale / t.grad_accum",
        "the data-parallel sum is not averaged (gradients dp times too large)",
        (par_layout("DP2-zero0"),),
    ),
    Mutant(
        "loss-scale-no-grad-accum",
        "Trainer._gradients",
        "scale = loss_scale / (t.grad_accum * dp)",
        "scale = loss_scale / dp",
        "gradient accumulation sums the micro-batches' gradients instead of averaging them (Adam is nearly "
        "scale-invariant, but the grad norm, the clipping threshold and eps see grad_accum times the gradient)",
        (T_OPTIM, T_TRAIN, par_layout("DP2-zero0")),
    ),
    Mutant(
        "clip-min-max",
        "Trainer.train_step",
        "clip = min(1.0, t.grad_clip / (norm + 1e-6))",
        "clip = max(1.0, t.grad_clip / (norm + 1e-6))",
        "clip factor with max for min: small gradients are scaled up to the clip norm, large ones pass unclipped",
        (T_OPTIM, T_TRAIN),
    ),
    Mutant(
        "zero-norm-over-tp-group",
        "_norm_ranges",
        "return keep, grid.world if sync.zero else grid.mp_comm",
        "return keep, grid.mp_comm",
        "ZeRO-1: the grad norm sums only this rank's shard (not over the data-parallel group)",
        (T_OPTIM, par_layout("DP2-zero1")),
    ),
    Mutant(
        "zero-piece-equal-length",
        "GradientSync.piece",
        "return a + sum(counts[:r]), a + sum(counts[: r + 1])",
        "return a + sum(counts[:r]), a + sum(counts[:r]) + counts[0]",
        "ZeRO-1 ownership assumes equal pieces (c[0] for c[r]): ranks past n % dp own one element of the next rank",
        (T_OPTIM, par_layout("DP2-zero1"), par_layout("DP4-zero1")),
    ),
    Mutant(
        "zero-params-not-gathered",
        "Trainer.train_step",
        "self.sync.gather(self.model.flat)",
        "pass",
        "ZeRO-1: the updated parameter shards are not allgathered after the step",
        (T_OPTIM, par_layout("DP2-zero1")),
    ),
    Mutant(
        "dp-loss-not-averaged",
        "Trainer._gradients",
        "return self.grid.world.allreduce_scalar(mine) / dp, norm",
        "return self.grid.world.allreduce_scalar(mine), norm",
        "the reported loss is the sum over data-parallel ranks, not their mean",
        (par_layout("DP2-zero0"),),
    ),
    # -- checkpoints: write and restore ------------------------------------------------------------------------------
    Mutant(
        "restore-moments-swapped",
        "_read_tensors",
        'group = f"optimizer/{slot}"',
        "group = f\"optimizer/{'v' if slot == 'm' else 'm'}\"",
        "resume reads the saved v into m and m into v",
        (*T_TRAIN_RESUME,),
    ),
    Mutant(
        "restore-adam-t-dropped",
        "_fill_state",
        'parts.opt.t = st["adam_t"]',
        "pass",
        "resume does not restore Adam's step counter (bias corrections restart at t = 1)",
        (*T_TRAIN_RESUME,),
    ),
    Mutant(
        "restore-step-dropped",
        "_fill_state",
        'state.step = st["step"]',
        "pass",
        "resume does not restore the step (batches, dropout masks and the lr schedule restart from 0)",
        (*T_TRAIN_RESUME,),
    ),
    Mutant(
        "save-v-written-as-m",
        "ElementPlacement.fetch",
        "buf = getattr(self.opt, slot)",
        "buf = self.opt.m",
        "save (without ZeRO-1) writes the first moment into both optimizer slots",
        (*T_TRAIN_RESUME,),
    ),
    Mutant(
        "restore-shard-last-row-floored",
        "ShardIO._read_spec_range",
        "r0, r1 = lo // row, -(-hi // row)",
        "r0, r1 = lo // row, hi // row",
        "restore of a shard range: the last, partly covered row is not read (floor instead of ceil)",
        (T_PAR_RESUME, T_RESUME_LAYOUTS),
    ),
    Mutant(
        "ckpt-read-ignores-hyperslab",
        "CheckpointFile.read",
        "dset.read_direct(out, source_sel=index or None)",
        "dset.read_direct(out)",
        "CheckpointFile.read into a buffer ignores the hyperslab (reads from the dataset's start)",
        (*T_TRAIN_RESUME, T_PAR_RESUME, T_RESUME_LAYOUTS),
    ),
    Mutant(
        "ckpt-verify-share-inverted",
        "CheckpointFile.share",
        "if who == part}",
        "if who != part}",
        "checkpoint verification: each rank checks the datasets of the other ranks' shares (alone: none at all)",
        (T_CKPT,),
    ),
    # -- sampling, generation and batches ----------------------------------------------------------------------------
    Mutant(
        "sample-temperature-multiplies",
        "sample_sharded",
        "z = z / temperature",
        "z = z * temperature",
        "sampling multiplies the logits by the temperature (equivalent at temperature 1)",
        (T_GEN, T_CLI_GENERATE),
    ),
    Mutant(
        "top-k-excludes-kth",
        "sample_sharded",
        "z = np.where(z >= _top_k_threshold(z, k, comm)[:, None], z, -np.inf)",
        "z = np.where(z > _top_k_threshold(z, k, comm)[:, None], z, -np.inf)",
        "top-k keeps the k-1 largest logits (the k-th itself is masked; top_k=1 masks everything)",
        (T_GEN,),
    ),
    Mutant(
        "window-restart-precedence",
        "_decode",
        "np.asarray(out[r][-(T // 2) :])",
        "np.asarray(out[r][-T // 2 :])",
        "window restart keeps -T // 2 = ceil(T/2) tokens (operator precedence; equivalent for even block_size)",
        (T_GEN,),
    ),
    Mutant(
        "prompt-head-not-tail",
        "_decode",
        "logits = _prefill(model, cache, [p[-T:] for p in prompts])",
        "logits = _prefill(model, cache, [p[:T] for p in prompts])",
        "a prompt longer than block_size is cut to its first block_size tokens instead of its last",
        (T_GEN,),
    ),
    # -- inference: per-row positions of the KV cache, sampling over vocabulary shards, the cache pool, eval dp ---
    Mutant(
        "cached-attn-row-query-pos-off-by-one",
        "cached_attention_forward",
        "xp.asarray(pos)[:, None] + xp.arange(Tn)[None, :]",
        "xp.asarray(pos)[:, None] + xp.arange(Tn)[None, :] + 1",
        "per-row cached attention: each query also sees the key one position after its own (padding or stale)",
        (
            inf_test("test_cache_rows_have_their_own_lengths"),
            inf_test("test_batched_prompts_equal_unbatched"),
        ),
    ),
    Mutant(
        "vocab-emb-row-pos-off-by-one",
        "vocab_parallel_embedding_forward",
        "positions = wpe[xp.asarray(pos0)[:, None] + xp.arange(idx.shape[1])[None, :]]",
        "positions = wpe[xp.asarray(pos0)[:, None] + 1 + xp.arange(idx.shape[1])[None, :]]",
        "per-row embedding: row b's new tokens get the position embeddings from pos0[b] + 1",
        (
            inf_test("test_cache_rows_have_their_own_lengths"),
            inf_test("test_batched_prompts_equal_unbatched"),
        ),
    ),
    Mutant(
        "top-p-shard-prefix-inclusive",
        "candidates",
        "before = np.cumsum(ps, axis=1) - ps",
        "before = np.cumsum(ps, axis=1)",
        "top-p candidates: a shard stops before the entry whose mass reaches top_p (the nucleus boundary is lost)",
        (
            inf_test("test_top_p_set_equals_reference"),
            inf_test("test_sharded_candidates_equal_full_vocabulary"),
        ),
    ),
    Mutant(
        "inverse-cdf-owner-one-rank-late",
        "_inverse_cdf",
        "owner = (cum <= target[None, :]).sum(axis=0)",
        "owner = (cum - mass <= target[None, :]).sum(axis=0)",
        "inverse CDF over shards: the owner is the first rank whose mass *before* it passes u (one rank too far)",
        (inf_test("test_tp_generation_equals_single_process"),),
    ),
    Mutant(
        "greedy-ties-last-rank",
        "_greedy",
        "best = every[:, :, 0].argmax(axis=0)",
        "best = every.shape[0] - 1 - every[::-1, :, 0].argmax(axis=0)",
        "sharded greedy: a tie across shards goes to the last rank (not the lowest index, as argmax on the row)",
        (
            inf_test("test_greedy_ties_take_the_lowest_index"),
            inf_test("test_sharded_candidates_equal_full_vocabulary"),
        ),
    ),
    Mutant(
        "greedy-ties-last-in-shard",
        "_greedy",
        "a = z.argmax(axis=1)",
        "a = z.shape[1] - 1 - z[:, ::-1].argmax(axis=1)",
        "greedy: a tie within a shard goes to the highest index",
        (
            inf_test("test_greedy_ties_take_the_lowest_index"),
            inf_test("test_sharded_candidates_equal_full_vocabulary"),
        ),
    ),
    Mutant(
        "kv-pool-exact-size-only",
        "KVCache.__init__",
        "if free is not None and free.size < size:",
        "if free is not None and free.size != size:",
        "KV-cache pool: a larger pooled buffer is dropped instead of serving a smaller batch",
        (inf_test("test_kv_pool_holds_one_buffer"),),
    ),
    Mutant(
        "eval-dp-not-reduced",
        "evaluate",
        'sums = dp_comm.allreduce_(np.array([total, count, n_windows], dtype=np.float64), op="sum")',
        "sums = np.array([total, count, n_windows], dtype=np.float64)",
        "eval under data parallelism: each replica reports its own batches' loss (no sum over the dp group)",
        (inf_test("test_dp_eval_equals_single_process"),),
    ),
    Mutant(
        "batch-targets-not-shifted",
        "get_batch",
        "return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])",
        "return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, :-1])",
        "get_batch returns the inputs as targets (no shift by one)",
        (T_DATA, "test_train.py::test_loss_falls"),
    ),
    # -- memory at scale: sequence parallelism, selective recompute -----------------------------------------------
    Mutant(
        "sp-layernorm-partials-not-summed",
        "SlicePartials.reduce",
        "self.tp.allreduce_(self.buf)",
        "self.tp.allreduce_(self.buf[:0])",
        "sequence parallelism: each TP rank keeps the LayerNorm gradients of its own positions only (no sum)",
        (tp_test("test_sequence_parallel_block_equals_single_process"), par_layout("TP2-SP-zero0")),
    ),
    Mutant(
        "sp-dropout-first-positions",
        "slice_rng",
        "return rng.for_positions(tp.rank * n, (tp.rank + 1) * n, tp.size * n)",
        "return rng.for_positions(0, n, tp.size * n)",
        "sequence parallelism: every TP rank draws the first positions' branch dropout masks, not its own",
        (tp_test("test_sequence_parallel_block_equals_single_process"),),
    ),
    Mutant(
        "selective-masks-not-redrawn",
        "Block.backward_input",
        "drop = self.dropout",
        "drop = 0.0",
        "selective recompute: attention's probabilities recomputed without their dropout masks",
        ("test_recompute.py",),
    ),
    # -- ZeRO-2/3 ---------------------------------------------------------------------------------------------------
    Mutant(
        "zero2-unowned-gradient-kept",
        "GradientSync.settle_unit",
        "self.release_unowned(self.g, i)",
        "pass",
        "ZeRO-2/3: a unit's gradient outside the owned piece is not zeroed after its reduction (the next micro-batch "
        "adds onto it)",
        ("test_zero.py::test_zero_matches_single_process[DP2-zero2]",),
    ),
    Mutant(
        "zero3-gather-not-waited",
        "ZeroHooks._complete",
        "h.wait()",
        "h.test()",
        "ZeRO-3: a part computes with its units' gathers possibly still in flight",
        ("test_zero.py::test_zero_matches_single_process[DP2-zero3]",),
    ),
    Mutant(
        "zero-tied-copies-not-summed",
        "Trainer._sum_tied_embedding",
        "for a, b in whole if self.zero is None else intersect_ranges(self.sync.owned, whole):",
        "for a, b in whole if self.zero is None else []:",
        "pipeline with ZeRO-2/3: the tied embedding's two copies keep their own gradients (no sum of the owned pieces)",
        ("test_zero.py::test_zero_matches_single_process[PP2xDP2-zero3]",),
    ),
    Mutant(
        "batch-offset-high-off-by-one",
        "get_batch",
        "offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)",
        "offsets = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)",
        "get_batch never draws the last window of the split (exclusive bound off by one)",
        (T_DATA,),
    ),
    # -- fp16 at its edges: the unscale, the loss scaler, PowerSGD across a loss-scale change, the wire's headroom ---
    Mutant(
        "fp16-step-not-unscaled",
        "Trainer.train_step",
        "self.opt.step(lr, grad_scale=clip / loss_scale)",
        "self.opt.step(lr, grad_scale=clip)",
        "fp16: the optimizer step takes the loss-scaled gradients (AdamW is nearly invariant to the factor: only eps "
        "and the clipping see it)",
        (F16_STEP,),
    ),
    Mutant(
        "scaler-growth-count-kept-after-overflow",
        "LossScaler.update",
        "self.growth_tracker = 0\n",
        "pass\n",
        "fp16 loss scaler: an overflow does not restart the count of clean steps (the scale grows before `window` "
        "clean steps in a row)",
        (F16_SCALER,),
    ),
    Mutant(
        "powersgd-error-not-rescaled",
        "PowerSGD.reduce",
        "M += self.error[name] if loss_scale == 1 else self.error[name] * it(loss_scale)",
        "M += self.error[name]",
        "PowerSGD under fp16: the stored error (in true gradient units) is added to this step's loss-scaled gradient "
        "without being carried into its units",
        (F16_POWERSGD,),
    ),
    Mutant(
        "powersgd-error-kept-scaled",
        "PowerSGD.reduce",
        "E /= it(loss_scale)",
        "pass",
        "PowerSGD under fp16: the new error is stored in the units of the step that made it (loss-scaled), so a "
        "change of scale mis-weighs it",
        (F16_POWERSGD,),
    ),
    Mutant(
        "powersgd-skipped-step-kept",
        "PowerSGD.settle",
        "self.error, self.q = self._previous",
        "pass",
        "PowerSGD: a step the trainer skips (an outlier, an overflow elsewhere) keeps its error feedback, so its "
        "gradient comes back in later steps",
        (F16_POWERSGD,),
    ),
    Mutant(
        "wire16-headroom-one-less",
        "scale_for",
        "headroom: int = 1",
        "headroom: int = 0",
        "16-bit wire: the fp16 scale puts a piece's largest value in [2^15, 2^16), no headroom for rounding up past "
        "65504",
        (F16_WIRE,),
    ),
    # -- the wave's numeric code: precision, recompute, LoRA, int8, sharded sampling, tokenizers, token files, eval ---
    Mutant(
        "prec-operand-not-rounded",
        "Precision._operand",
        "return round_low_(x.copy(), self.low)",
        "return x.copy()",
        "mixed precision: matmul operands are not rounded to bf16/fp16 (the arithmetic is fp32's)",
        (T_PREC,),
    ),
    Mutant(
        "prec-round-half-chunk",
        "round_low_",
        "flat[a : a + PIECE] = flat[a : a + PIECE].astype(low)",
        "flat[a : a + PIECE // 2] = flat[a : a + PIECE // 2].astype(low)",
        "mixed precision: the twin's in-place rounding walks pieces of 2^18 but rounds only the first half of each "
        "(large operands partly unrounded: fp16, and bf16 off the compiled path)",
        (T_PREC,),
    ),
    Mutant(
        "prec-keep-full-width",
        "Precision.keep",
        "        return to_low(x, self.low)",
        "        return x",
        "mixed precision: the activations kept for backward stay fp32 (unrounded, twice the bytes)",
        (T_PREC,),
    ),
    Mutant(
        "recompute-block-without-dropout-rng",
        "Chunk._backward",
        "_, block_cache = block.forward(block_cache, rng)",
        "_, block_cache = block.forward(block_cache, None)",
        "block recompute: backward's second forward runs without the dropout rng (no masks, other activations)",
        (T_RECOMPUTE,),
    ),
    Mutant(
        "recompute-block-input-not-copied",
        "Chunk.forward",
        "caches.append(x.copy())  # the block updates its input in place",
        "caches.append(x)",
        "block recompute: the kept block input is a view the block then updates in place (backward recomputes from "
        "the block's output)",
        (T_RECOMPUTE,),
    ),
    Mutant(
        "selective-keeps-gelu-tanh",
        "Block.forward",
        "keep_t=not self.selective",
        "keep_t=True",
        "selective recompute keeps GELU's tanh anyway (the memory it exists to save)",
        (T_RECOMPUTE,),
    ),
    Mutant(
        "lora-col-dh-not-summed",
        "ColumnParallelLinear.backward_input",
        "dh = self.prec.operand(copy_to_tp_region_backward(dh, self.comm))",
        "dh = self.prec.operand(dh)",
        "LoRA under TP: a column-parallel layer's adapter gradient dh (a partial per rank) is not summed before dA",
        ("test_finetune.py::test_lora_tp2_gradients_equal_single_process",),
    ),
    Mutant(
        "lora-row-scale-dropped-in-backward",
        "RowParallelLinear.backward_input",
        "dys = self.prec.operand(dy * s) if s != 1 else dy",
        "dys = dy",
        "LoRA: a row-parallel layer's backward leaves out lora_scale (forward has it)",
        ("test_finetune.py::test_lora_gradients_match_finite_differences",),
    ),
    Mutant(
        "lora-b-not-zero",
        "_lora_rows",
        "(r, n_out), Init.ZEROS, 0.0",
        "(r, n_out), Init.NORMAL, 0.02",
        "LoRA: B initialised like a weight, not zero (the adapted model does not start as the base model)",
        ("test_finetune.py::test_lora_specs_and_start_equal_base",),
    ),
    Mutant(
        "int8-scale-over-255",
        "QuantizedWeight.quantize",
        "scale = (amax / 127.0).astype(np.float32)",
        "scale = (amax / 255.0).astype(np.float32)",
        "int8: the scale spreads absmax over 255 steps (uint8's), so large weights saturate at 127",
        (INT8_TESTS,),
    ),
    Mutant(
        "int8-truncates",
        "QuantizedWeight.quantize",
        "np.clip(np.rint(w32 / safe.reshape(shape)), -127, 127)",
        "np.clip(w32 / safe.reshape(shape), -127, 127)",
        "int8: weights truncated toward zero instead of rounded to nearest (error up to s, not s/2)",
        (INT8_TESTS,),
    ),
    Mutant(
        "int8-row-parallel-local-absmax",
        "QuantizedWeight.quantize",
        'comm.allreduce_(amax, op="max")',
        "pass",
        "int8 under TP: a row-parallel layer's column scales from the local rows' absmax only (not the single "
        "process's)",
        (inf_test("test_tp_reads_only_its_shards"),),
    ),
    Mutant(
        "topk-shards-send-k-minus-1",
        "_top_k_threshold",
        "kl = min(k, z.shape[1])",
        "kl = min(k - 1, z.shape[1])",
        "sharded top-k: each shard sends its k-1 largest, so the k-th largest of the row can be missing",
        ("test_generate.py::test_top_k_support_on_fixed_logits", SHARDED),
    ),
    Mutant(
        "candidates-normalised-per-shard",
        "candidates",
        's = comm.allreduce_(e.sum(axis=1), op="sum")',
        "s = e.sum(axis=1)",
        "sharded top-p: each shard normalises its probabilities by its own mass, not the whole row's",
        (SHARDED,),
    ),
    Mutant(
        "nucleus-not-renormalised",
        "_nucleus_draw",
        "total = c[rows, m - 1]",
        "total = c[rows, -1]",
        "top-p: the draw is scaled by every candidate's mass, not the nucleus's (the last nucleus entry is drawn too "
        "often)",
        (inf_test("test_top_p_draw_renormalised_over_the_nucleus_alone"),),
    ),
    Mutant(
        "inverse-cdf-local-max",
        "_inverse_cdf",
        "m = _row_max(z, comm)",
        "m = z.max(axis=1)",
        "sharded sampling: each shard exponentiates against its own maximum, so the shards' masses are on different "
        "scales",
        (inf_test("test_tp_generation_equals_single_process"),),
    ),
    Mutant(
        "char-encode-no-membership",
        "CharTokenizer.encode",
        "ok[ok] = self._codes[ids[ok]] == codes[ok]",
        "ok[ok] = True",
        "char tokenizer: a character outside the vocabulary encodes as the next one in code-point order",
        ("test_data.py::test_char_character_between_vocabulary_entries_named",),
    ),
    Mutant(
        "ids-dtype-boundary",
        "ids_dtype",
        "vocab_size <= UINT16_VOCAB",
        "vocab_size < UINT16_VOCAB",
        "token ids: a vocabulary of exactly 65536 gets uint32 files (uint16 holds ids 0..65535)",
        ("test_data.py::test_ids_dtype_at_the_uint16_boundary",),
    ),
    Mutant(
        "check-ids-off-by-one",
        "_check_ids",
        "ids.max() >= vocab_size",
        "ids.max() > vocab_size",
        "decode: the id vocab_size (one past the last) is accepted",
        ("test_data.py::test_decode_refuses_the_id_past_the_vocabulary",),
    ),
    Mutant(
        "splitwriter-val-offset",
        "SplitWriter.put",
        "(self.fds[1], ids[k:], at + k - self.n_train)",
        "(self.fds[1], ids[k:], at - self.n_train)",
        "token files: a piece straddling the train/val boundary writes its val part at the wrong offset",
        ("test_data.py::test_prepare_pieces_equal_whole_file_encoding",),
    ),
    Mutant(
        "meta-max-id-equal-vocab",
        "TokenData._read_meta",
        "if top >= vocab:",
        "if top > vocab:",
        "token files: a recorded max_id equal to vocab_size (one past the last id) is accepted",
        ("test_data.py::test_tokendata_max_id_beyond_vocab",),
    ),
    Mutant(
        "split-size-longer-accepted",
        "TokenData._load_split",
        "if size != n * item:",
        "if size < n * item:",
        "token files: a split file longer than meta.json's count is accepted (the tail never read, silently)",
        ("test_data.py::test_tokendata_train_file_of_another_size",),
    ),
    Mutant(
        "eval-targets-not-shifted",
        "evaluate",
        "y = np.stack([tokens[a + 1 : a + 1 + n] for a, n in batch]).astype(np.int64)",
        "y = np.stack([tokens[a : a + n] for a, n in batch]).astype(np.int64)",
        "eval: targets are the inputs, not the next tokens",
        (inf_test("test_eval_equals_reference"),),
    ),
    Mutant(
        "eval-tail-window-dropped",
        "batches",
        "out += [[w] for w in ws if w[1] != block_size]",
        "out += []",
        "eval: the short last window is left out (its predictions never made)",
        (
            inf_test("test_eval_windows_cover_every_prediction_once"),
            inf_test("test_eval_equals_reference"),
        ),
    ),
    Mutant(
        "eval-batch-weighed-by-rows",
        "evaluate",
        "total += float(loss) * y.size",
        "total += float(loss) * y.shape[1] * batch_size",
        "eval: each batch's mean loss weighed as a full batch (the short tail weighs as much as a full one)",
        (inf_test("test_eval_equals_reference"),),
    ),
]
