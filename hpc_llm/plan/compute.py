"""Time of one chunk's forward and backward on one rank: the operations modules.py and layers.py run, priced by the
cluster's figures.

Each layer is an inventory of what its code does: the matmuls (shape and count: NumPy runs a batched matmul as one
BLAS call per matrix), the elementwise passes (element reads + writes of each NumPy call, over arrays of a given
size, with the call's fixed cost), the exp/tanh elements, np.add.at's scattered rows, and the tensor-parallel
allreduces (blocking, so on the critical path). The counts follow the code line by line; where a pass runs on an
L2-sized chunk (GELU, AdamW, the gradient norm) the array size is the chunk's. bf16/fp16 (model/precision.py) add
every conversion between float32 and the format the code makes: keep (to the format), use (back), operand and
round_ (there and back), each priced at the cluster's cast rates (a NumPy cast to bfloat16 is compute-bound, ~10x an
add per element); on the host in bf16, GELU's and attention's head layout's are made in the compiled passes
(Pricer.fused), not after them (LayerNorm's, the held softmax's and oneDNN's carried operands' the same way are not
modelled: they depend on the pool and on oneDNN). Dropout's mask generation is not modelled (the validation runs
have dropout 0).
"""

from __future__ import annotations

from hpc_llm.config import ModelConfig
from hpc_llm.model.attention import query_blocks
from hpc_llm.model.layers import ELEMENTWISE_CHUNK
from hpc_llm.optim import CHUNK as ADAM_CHUNK
from hpc_llm.optim import NORM_CHUNK
from hpc_llm.plan import fused_attention
from hpc_llm.plan.launches import HEADS, block_counts, optimizer_counts
from hpc_llm.plan.pricer import Cost, Pricer


def _layernorm_fwd(p: Pricer, n: int) -> Cost:
    # mean (1), x - mean (2), einsum xhat.xhat (1), xhat *= rstd (2), out = xhat * w (2), out += b (2)
    return p.kernel("layernorm_forward", n, p.ew(10 * n, n, 9))


def _layernorm_bwd(p: Pricer, n: int) -> Cost:
    return _layernorm_weight(p, n) + _layernorm_input(p, n)


def _layernorm_weight(p: Pricer, n: int) -> Cost:
    # W: dw einsum (2), db sum (1)
    return p.kernel("layernorm_backward_weight", n, p.ew(3 * n, n, 2))


def _layernorm_input(p: Pricer, n: int) -> Cost:
    # B: dout * w (2), mean (1), einsum (2), -= mean (2), xhat * mean (2), -= (3), *= rstd (2)
    return p.kernel("layernorm_backward_input", n, p.ew(14 * n, n, 12))


def _bias(p: Pricer, n: int) -> Cost:
    """A linear layer's bias added to its n output elements (read, write)."""
    return p.kernel("bias_add", n, p.ew(2 * n, n))


def _residual(p: Pricer, n: int) -> Cost:
    """x += a over n elements (forward's residual adds, backward's dx +=)."""
    return p.kernel("residual_add", n, p.ew(3 * n, n))


def _bias_grad(p: Pricer, n: int) -> Cost:
    """A bias gradient: the sum of an output gradient's rows (n elements read)."""
    return p.kernel("column_sums", n, p.ew(n, n))


def _accumulate(p: Pricer, acc: bool, elems: int) -> Cost:
    """`out += a @ b` on later micro-batches: the product's temporary is read back and added."""
    return p.ew(3 * elems, elems) if acc else Cost()


def _probabilities(p: Pricer, b: int, h: int, hd: int, q0: int, q1: int, held: bool) -> Cost:
    """attention._probabilities: one query block's q k^T, its causal softmax, rounded in place (forward's, and
    selective recompute's again in backward); held: Pricer.held."""
    s = b * h * (q1 - q0) * q1
    # softmax: += mask (3), max (1), -= max (2), exp, sum (1), *= 1/sum (2)
    softmax = p.kernel("softmax_forward", s, p.ew(9 * s, s, 6) + p.exp(s))
    return p.gemm(q1 - q0, q1, hd, b * h, held) + softmax + p.round_(s)


def attention_core_forward(p: Pricer, b: int, T: int, h: int, hd: int, keep: bool = True) -> Cost:
    """attention_forward's loop over query blocks: the probabilities, the operand of the product with v as they
    are, and kept (keep False, recompute "selective": not kept)."""
    c, held = Cost(), p.held(T, hd)
    for q0, q1 in query_blocks(T):
        s = b * h * (q1 - q0) * q1
        c += _probabilities(p, b, h, hd, q0, q1, held) + p.gemm(q1 - q0, hd, q1, b * h, held)
        # keep(att); the operand is att itself (rounded by the softmax: dropout's scaled copy, rounded again, is
        # not modelled)
        c += p.keep(s) if keep else Cost()
    return c


def _column_input(p: Pricer, n: int) -> Cost:
    """A column-parallel layer's input in forward: kept (the cache) and used; with sp the slice is kept and used,
    then all-gathered."""
    r = n // p.tp if p.sp else n
    return p.keep(r) + p.use(r) + (p.kept_allgather(n) if p.sp else Cost())


def block_forward(p: Pricer, b: int, T: int, C: int, H: int, selective: bool = False) -> Cost:
    """selective (recompute "selective"): the probabilities and GELU's tanh are not kept (no conversions)."""
    tp = p.tp
    N, n = b * T, b * T * C
    nl, h, hd = n // tp, H // tp, C // H
    r = nl if p.sp else n  # LayerNorm, dropout, the residual stream: the slice with sp
    c = _layernorm_fwd(p, r) + p.keep(r)  # ln_1 (its xhat kept in the format)
    c += _column_input(p, n)  # ColumnParallelLinear: the input kept, then used
    c += p.linear(N, 3 * C // tp, C) + _bias(p, 3 * nl)  # qkv and its bias
    # split_heads copy, q *= scale, round_ (fused: the copy's pass does all three)
    fused = p.fused(3 * nl)
    split = p.ew(6 * nl, 3 * nl) + (Cost() if fused else p.ew(2 * nl, nl) + p.round_(3 * nl))
    c += p.kernel("to_heads", 3 * nl, split)
    c += attention_core_forward(p, b, T, h, hd, keep=not selective)
    c += p.keep(3 * nl)  # the head-split qkv kept
    c += p.kernel("from_heads", nl, p.ew(2 * nl, nl))  # merge_heads copy
    c += p.keep(nl) + p.use(nl)  # RowParallelLinear's input
    # proj, bias, residual
    c += p.linear(N, C, C // tp) + p.leave_row(n) + _bias(p, r) + _residual(p, r)
    c += _layernorm_fwd(p, r) + p.keep(r)
    c += _column_input(p, n)
    c += p.linear(N, 4 * C // tp, C) + _bias(p, 4 * nl)  # fc, bias
    # GELU by L2 chunks: x*x (2), *= (2), += (2), *= x (3), tanh, + 1 (2), *= x (3), *= 0.5 (2), then its tanh
    # (not with selective), its output and its input kept; fused: after the tanh one compiled pass (x and t read,
    # bf16 written)
    if p.fused(4 * nl):
        gelu = p.chunked(12 if selective else 12.5, 4 * nl, 6, ELEMENTWISE_CHUNK, True)
    else:
        gelu = p.chunked(16, 4 * nl, 8, ELEMENTWISE_CHUNK, True)
        c += p.keep(4 * nl) + p.keep(4 * nl) + (Cost() if selective else p.keep(4 * nl))
    c += p.kernel("gelu_forward", 4 * nl, gelu + p.exp(4 * nl))
    c += p.use(4 * nl)  # mlp_proj's input used
    return c + p.linear(N, C, 4 * C // tp) + p.leave_row(n) + _bias(p, r) + _residual(p, r)


def gelu_tanh(p: Pricer, elems: int) -> Cost:
    """layers.gelu_tanh (selective recompute's tanh in backward), by L2 chunks: x*x (2), *= (2), += (2), *= x (3),
    tanh."""
    return p.chunked(9, elems, 5, ELEMENTWISE_CHUNK, True) + p.exp(elems)


def _column_input_back(p: Pricer, n: int) -> Cost:
    """A column-parallel layer's kept input used in backward; with sp the slice is used and all-gathered again."""
    return p.use(n // p.tp) + p.kept_allgather(n) if p.sp else p.use(n)


def block_backward(
    p: Pricer,
    b: int,
    T: int,
    C: int,
    H: int,
    acc: bool,
    selective: bool = False,
    ln_params: int = 0,
) -> Cost:
    """Block.backward: its B and W at once (each W part run as B reaches it)."""
    return block_backward_input(p, b, T, C, H, selective) + block_weight(
        p, b, T, C, H, acc, ln_params
    )


def block_backward_input(
    p: Pricer, b: int, T: int, C: int, H: int, selective: bool = False, deferred: bool = False
) -> Cost:
    """B of a block's backward (the input gradient). selective (recompute "selective"): each query block's
    probabilities rebuilt from the kept q, k, v before its backward (their mask drawn again: not priced, as dropout's
    draws are not) instead of the kept ones used, and GELU's tanh from the GELU input (gelu_tanh) instead of the
    kept one used. deferred (W kept for a later op): the two branch gradients copied for W (WeightWork.keep)."""
    tp = p.tp
    N, n = b * T, b * T * C
    nl, h, hd = n // tp, H // tp, C // H
    r = nl if p.sp else n
    c = p.ew(4 * r, r, 2) if deferred else Cost()
    # mlp_proj: its gradient (sp: all-gathered from the slice) as an operand; the input gradient
    c += p.gathered_operand(n) + p.linear(N, 4 * C // tp, C)
    # GELU backward by chunks: 11 passes, 26 accesses per element (f and the tanh used); fused (the tanh kept):
    # one compiled pass reading f and t as bf16 (dout read and written, f and t: 3 accesses)
    if p.fused(4 * nl) and not selective:
        c += p.ew(3 * 4 * nl, 4 * nl)
    else:
        c += p.use(4 * nl) + (gelu_tanh(p, 4 * nl) if selective else p.use(4 * nl))
        c += p.kernel("gelu_backward", 4 * nl, p.chunked(26, 4 * nl, 11, ELEMENTWISE_CHUNK, True))
    c += p.operand(4 * nl) + p.linear(N, C, 4 * C // tp) + p.column_input_grad(n)  # fc
    c += p.use(r) + _layernorm_input(p, r) + _residual(p, r)  # ln_2, dx +=
    c += p.gathered_operand(n) + p.linear(N, C // tp, C)  # attn_proj
    # qkvh used, dyh copy rounded (fused: in the copy's pass)
    split = p.ew(2 * nl, nl) + (Cost() if p.fused(nl) else p.round_(nl))
    c += p.use(3 * nl) + p.kernel("to_heads", nl, split)
    held = p.held(T, hd)
    for i, (q0, q1) in enumerate(query_blocks(T)):
        qb, s, kv = q1 - q0, b * h * (q1 - q0) * q1, b * h * q1 * hd
        # the probabilities: rebuilt (selective) or the kept ones used
        c += _probabilities(p, b, h, hd, q0, q1, held) if selective else p.use(s)
        c += p.gemm(q1, hd, qb, b * h, held) + p.gemm(qb, q1, hd, b * h, held)  # dv, datt
        # rowdot einsum (2), -= (2), *= att (3); round_(datt)
        c += p.kernel("softmax_backward", s, p.ew(7 * s, s, 4)) + p.round_(s)
        c += p.gemm(qb, hd, q1, b * h, held) + p.gemm(q1, hd, qb, b * h, held)  # dq, dk
        if i > 0:  # later blocks add into dv and dk
            c += p.ew(6 * kv, kv, 2)
    # dq *= scale, transposed copy
    c += p.kernel("from_heads", 3 * nl, p.ew(2 * nl, nl) + p.ew(6 * nl, 3 * nl))
    c += p.operand(3 * nl) + p.linear(N, C, 3 * C // tp) + p.column_input_grad(n)  # qkv
    return c + p.use(r) + _layernorm_input(p, r) + _residual(p, r)  # ln_1, dx +=


def block_weight(
    p: Pricer, b: int, T: int, C: int, H: int, acc: bool, ln_params: int = 0, deferred: bool = False
) -> Cost:
    """W of a block's backward: each linear's weight gradient (its kept input used; sp: a column-parallel one's
    all-gathered again) and bias (row sums), the LayerNorms' (deferred: their kept xhat converted again), and with
    sp the LayerNorms' partial gradients (ln_params elements each) summed over the TP group (SlicePartials)."""
    tp = p.tp
    N, n = b * T, b * T * C
    nl = n // tp
    r = nl if p.sp else n
    c = p.use(4 * nl) + p.weight_linear(4 * C // tp, C, N) + _accumulate(p, acc, 4 * C // tp * C)
    c += _bias_grad(p, n)  # mlp_proj
    c += (
        _column_input_back(p, n)
        + p.weight_linear(C, 4 * C // tp, N)
        + _accumulate(p, acc, C * 4 * C // tp)
    )
    c += _bias_grad(p, 4 * nl)  # fc
    c += (
        p.use(nl)
        + p.weight_linear(C // tp, C, N)
        + _accumulate(p, acc, C // tp * C)
        + _bias_grad(p, n)
    )  # attn_proj
    c += (
        _column_input_back(p, n)
        + p.weight_linear(C, 3 * C // tp, N)
        + _accumulate(p, acc, C * 3 * C // tp)
    )
    c += _bias_grad(p, 3 * nl)  # qkv
    for _ in range(2):  # ln_2, ln_1
        c += _layernorm_weight(p, r)
    if p.sp:
        c += p.allreduce(2 * ln_params * p.it)  # SlicePartials.reduce
    return c


def head_forward(p: Pricer, b: int, T: int, C: int, V: int) -> Cost:
    N, n, Vl = b * T, b * T * C, V // p.tp
    # ln_f's xhat; xf2 as operand, then kept; sp: ln_f on the slice, which is kept, used and all-gathered, then the
    # whole as the operand. gemm16: xf2 kept in 16 bits, the operand (sp: the kept slice's bits gathered)
    if p.sp:
        r = n // p.tp
        c = _layernorm_fwd(p, r) + p.keep(r) + p.keep(r)
        if p.gemm16:
            c += p.kept_allgather(n)
        else:
            c = c + p.use(r) + p.allgather(n) + p.operand(n)
    elif p.gemm16:
        c = _layernorm_fwd(p, n) + p.keep(n) + p.keep(n)
    else:
        c = _layernorm_fwd(p, n) + p.keep(n) + p.operand(n) + p.keep(n)
    c += p.weight_linear(N, Vl, C)
    # cross-entropy in place: max (1), -= (2), exp, sum (1), *= 1/sum (2); pad columns masked
    c += p.kernel("cross_entropy", N * Vl, p.ew(6 * N * Vl, N * Vl, 10) + p.exp(N * Vl))
    for _ in range(3):  # max, target logit, sum of exp: N values each
        c += p.allreduce(N * p.it)
    return c


def head_backward(p: Pricer, b: int, T: int, C: int, V: int, acc: bool, ln_params: int = 0) -> Cost:
    return head_backward_input(p, b, T, C, V) + head_weight(p, b, T, C, V, acc, ln_params)


def head_backward_input(p: Pricer, b: int, T: int, C: int, V: int) -> Cost:
    """B: the probabilities *= scale / N and rounded (gemm16: kept in 16 bits, for both GEMMs), the input gradient
    (sp: reduce-scattered), ln_f's."""
    N, n, Vl = b * T, b * T * C, V // p.tp
    r = n // p.tp if p.sp else n
    c = p.kernel("cross_entropy_backward", N * Vl, p.ew(2 * N * Vl, N * Vl))
    c += p.keep(N * Vl) if p.gemm16 else p.round_(N * Vl)
    c += p.weight_linear(N, C, Vl) + p.column_input_grad(n)
    return c + p.use(r) + _layernorm_input(p, r)


def head_weight(p: Pricer, b: int, T: int, C: int, V: int, acc: bool, ln_params: int = 0) -> Cost:
    """W: wte's gradient (xf2 used; sp: the kept slice gathered again; gemm16: the kept bits, and cuBLAS adds into
    the gradient), ln_f's, and with sp ln_f's partial gradients (ln_params elements) summed over the TP group (run
    with the head's B, never deferred)."""
    N, n, Vl = b * T, b * T * C, V // p.tp
    r = n // p.tp if p.sp else n
    if p.gemm16:
        c = (p.kept_allgather(n) if p.sp else Cost()) + p.linear(Vl, C, N)
    else:
        c = _column_input_back(p, n) + p.weight_linear(Vl, C, N) + _accumulate(p, acc, Vl * C)
    c += _layernorm_weight(p, r)
    if p.sp:
        c += p.allreduce(ln_params * p.it)
    return c


def embedding_forward(p: Pricer, b: int, T: int, C: int) -> Cost:
    """wte[idx] (masked to this rank's rows with tp > 1, summed over the group: allreduce, or with sp
    reduce-scatter), then += wpe (on the slice with sp)."""
    n = b * T * C
    r = n // p.tp if p.sp else n
    c = p.ew(2 * n, n)  # wte[idx]
    if p.tp > 1:
        c += p.ew(2 * n, n) + p.leave_row(n)
    return c + p.ew(3 * r, r)  # += wpe


def embedding_backward(p: Pricer, b: int, T: int, C: int) -> Cost:
    """sp: the slice's gradient all-gathered first; position rows summed; np.add.at into wte's rows."""
    n = b * T * C
    return p.enter_column(n) + _bias_grad(p, n) + p.kernel("scatter_add", n, p.scatter(n))


def chunk_costs(
    cfg: ModelConfig,
    p: Pricer,
    b: int,
    n_blocks: int,
    embedding: bool,
    head: bool,
    recompute: str = "none",
) -> dict:
    """{"F": Cost, "B": Cost, "B+": Cost (a later micro-batch's backward: gradients accumulate)} of one chunk; its
    backward split in two ops (zero-bubble schedules): "Bi" and "Bi+" (B: the input gradient, with "block"
    recompute's forwards, and the head's W, which runs with it), "W" and "W+" (the other weight gradients); the parts
    of a backward or W that time its grad_ready reports:
    "head_B", "block_B", "block_W" (and "+" accumulating); and the parts' own costs (ZeRO-3's prefetch):
    "emb_F", "block_F", "head_F", "emb_B"."""
    T, C, H, V = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.padded_vocab
    ln = (2 if cfg.bias else 1) * C  # one LayerNorm's parameters
    selective = recompute == "selective"
    f = Cost()
    if embedding:
        f += embedding_forward(p, b, T, C)
    bf = block_forward(p, b, T, C, H, selective)
    counted = _block_ledgers(cfg, p, selective) if p.cl.backend == "cupy" else None
    if counted is not None:
        attn = fused_attention.gemm_delta(p, b, T, H // p.tp, C // H, False, selective)
        bf = _counted_block(p, bf, counted.forward, b * (H // p.tp) / HEADS, attn)
    for _ in range(n_blocks):
        f += bf
    if head:
        f += head_forward(p, b, T, C, V)
    out = {"F": f}
    # "block": its forward again, to rebuild its cache
    again = bf if recompute == "block" else Cost()

    def block_b(acc: bool) -> Cost:
        inv = block_backward(p, b, T, C, H, acc, selective, ln)
        if (
            counted is not None
        ):  # accumulating adds the inventory's extra passes to the counted backward
            extra = inv.compute - block_backward(p, b, T, C, H, False, selective, ln).compute
            attn = fused_attention.gemm_delta(p, b, T, H // p.tp, C // H, True, selective)
            inv = _counted_block(p, inv, counted.backward, b * (H // p.tp) / HEADS, attn)
            inv += Cost(extra)
        return inv + again

    def whole(part, n: int) -> Cost:
        c = Cost()
        for _ in range(n):
            c += part
        return c

    for key, acc in (("B", False), ("B+", True)):
        c = head_backward(p, b, T, C, V, acc, ln) if head else Cost()
        c += whole(block_b(acc), n_blocks)
        out[key] = c + (embedding_backward(p, b, T, C) if embedding else Cost())
    blocks_bi = whole(block_backward_input(p, b, T, C, H, selective, True) + again, n_blocks)
    for key, acc in (("", False), ("+", True)):
        out["head_B" + key] = head_backward(p, b, T, C, V, acc, ln) if head else Cost()
        out["Bi" + key] = out["head_B" + key] + blocks_bi
        out["block_B" + key] = block_b(acc)
        out["block_W" + key] = block_weight(p, b, T, C, H, acc, ln, True)
        w = whole(out["block_W" + key], n_blocks)
        out["W" + key] = w + (embedding_backward(p, b, T, C) if embedding else Cost())
    # each part's forward, and the embedding's backward: what a ZeRO-3 prefetch hides behind
    out["emb_F"] = embedding_forward(p, b, T, C) if embedding else Cost()
    out["block_F"] = bf
    out["head_F"] = head_forward(p, b, T, C, V) if head else Cost()
    out["emb_B"] = embedding_backward(p, b, T, C) if embedding else Cost()
    return out


def _block_ledgers(cfg: ModelConfig, p: Pricer, selective: bool):
    """A device backend's counted Block (plan/launches.py) at this pricer's setting."""
    fmt = {"bfloat16": "bf16", "float16": "fp16", None: "fp32"}
    precision = fmt[p.low]
    return block_counts(
        T=cfg.block_size,
        head_dim=cfg.n_embd // cfg.n_head,
        tp=p.tp,
        precision=precision,
        recompute="selective" if selective else "none",
        dropout=cfg.dropout,
        sp=p.sp,
        dtype="float64" if p.it == 8 else "float32",
        act_comm=fmt[p.comm_low],
    )


def _counted_block(p: Pricer, inv: Cost, ledger, scale: float, attn_gemm: float = 0.0) -> Cost:
    """A Block's forward or backward on a device: the inventory's GEMMs (attn_gemm: the fused attention's products
    in place of the unfused loop's, plan/fused_attention.py) and TP collectives, and the elementwise launches and
    bytes the harness counted (its bytes times scale: rows x heads per rank / HEADS)."""
    calls = ledger.elementwise - ledger.launches["tp_collective"]
    nbytes = ledger.elementwise_bytes * scale
    per_call = nbytes / max(calls, 1)
    ew = p.share * p.cl.pass_time(nbytes / 4, 4, per_call / 4, calls)
    gemm = inv.gemm + attn_gemm
    return Cost(gemm + ew, inv.tp, gemm)


def optimizer_time(p: Pricer, owned: int) -> float:
    """AdamW over the owned elements: p, g, m, v read and p, m, v written once from memory; 13 passes (31
    accesses per element) on L2-sized chunks."""
    if owned == 0:
        return 0.0
    if p.cl.backend == "cupy":
        return _counted(p, ("adamw",), owned)
    passes = p.ew(7 * owned, owned, 0) + p.chunked(31, owned, 13, ADAM_CHUNK)
    return p.kernel("adamw", owned, passes).compute


def refresh_time(p: Pricer, elems: int) -> float:
    """GPT.refresh_compute after the step (bf16/fp16): the rank's weights rounded into the compute copy, by
    pieces of 2^20 elements (each Precision.operand: there and back)."""
    if p.cl.backend == "cupy":
        return _counted(p, None, elems) if p.low else 0.0
    pieces = max(1, -(-elems // (1 << 20)))
    return (p._cast(elems, True, pieces) + p._cast(elems, False, pieces)).compute


def norm_time(p: Pricer, elems: int) -> float:
    """global_grad_norm: each chunk read once, cast to float64 and dotted with itself (16 B per element in cache)."""
    if elems == 0:
        return 0.0
    if p.cl.backend == "cupy":
        return _counted(p, ("sumsq", "sumsq_finish"), elems)
    n_chunks = max(1, -(-elems // NORM_CHUNK))
    mem = p.ew(elems, elems, 0).compute
    cache = p.share * p.cl.pass_time(2 * elems, 8, min(NORM_CHUNK, elems), 3 * n_chunks)
    return mem + cache


# the optimizer step's device ledger is counted on this model (plan/launches.py); its bytes scale with the shard
_OPT_REF = (2, 128)


def _counted(p: Pricer, names, elems: int) -> float:
    """The device path's optimizer-step kernels `names` (None: those of the refresh), as counted: their launches at
    the cluster's call cost, and their bytes per shard element (at the reference model) times elems at its
    streaming bandwidth."""
    precision = {"bfloat16": "bf16", "float16": "fp16", None: "fp32"}[p.low]
    ledger = optimizer_counts(*_OPT_REF, precision)
    ref = (
        optimizer_counts(*_OPT_REF, "fp32").nbytes["adamw"] // 28
    )  # AdamW moves 7 x 4 bytes per element
    if names is None:  # the rest: the compute copy's refresh
        names = set(ledger.launches) - {"adamw", "sumsq", "sumsq_finish"}
    calls = sum(ledger.launches[k] for k in names)
    nbytes = sum(ledger.nbytes[k] for k in names) / ref * elems
    return p.share * p.cl.pass_time(nbytes / p.it, p.it, elems, calls)
