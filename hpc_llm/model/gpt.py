"""GPT-2: the parameter registry (flat buffers), forward, backward, and incremental decoding with a KV cache.

All parameters live in one contiguous buffer `model.flat` and their gradients in `model.grad_flat` with the same layout;
`model.params[name]` and `model.grads[name]` are views. Under tensor parallelism a rank's buffers hold its shards
(`ParamSpec.local_shape`); `full_tensors` puts the logical tensors back together. Parameter names are GPT-2's Hugging Face names without the
`transformer.` prefix, and weights are stored (in, out) like its Conv1D, so imported weights need no transpose.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from hpc_llm.backend import to_device, to_host
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.model import layers as L
from hpc_llm.model import tensor_parallel as TP
from hpc_llm.parallel.comm import Comm


@dataclass(frozen=True)
class ParamSpec:
    """One tensor in the flat buffer, with what initialisation, the optimizer and tensor parallelism need.

    tp_axis: the axis split over the tensor-parallel group (None: replicated). tp_blocks: that axis is made of this many
    equal blocks each split separately (3 for the fused q|k|v columns, so each rank gets its heads' q, k and v).
    """

    name: str
    shape: tuple  # the full, logical shape (checkpoints, initialisation)
    offset: int  # where this rank's shard starts in the flat buffer
    init_std: float  # > 0: normal(0, std); 0: zeros; -1: ones
    decay: bool  # AdamW weight decay applies (2-D weights only, as nanoGPT)
    tp_axis: int | None = None
    tp_blocks: int = 1
    local_shape: tuple = ()  # this rank's shard: shape with tp_axis divided by the TP size

    @property
    def size(self) -> int:
        """Elements of this rank's shard (the flat buffer's share)."""
        return math.prod(self.local_shape)


def param_specs(cfg: ModelConfig, tp: int = 1) -> list[ParamSpec]:
    """The flat-buffer layout of one tensor-parallel rank (every rank of a TP group has the same layout). Within a block the decayed weights come first and the LayerNorm/bias parameters after,
    so weight decay touches a few contiguous ranges; blocks are in forward order, so a gradient bucket taken from the
    end of the buffer is complete early in backward."""
    C, V = cfg.n_embd, cfg.padded_vocab
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    rows = [("wte.weight", (V, C), std, True, 0, 1), ("wpe.weight", (cfg.block_size, C), std, True, None, 1)]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        rows += [
            (p + "attn.c_attn.weight", (C, 3 * C), std, True, 1, 3),
            (p + "attn.c_proj.weight", (C, C), proj_std, True, 0, 1),
            (p + "mlp.c_fc.weight", (C, 4 * C), std, True, 1, 1),
            (p + "mlp.c_proj.weight", (4 * C, C), proj_std, True, 0, 1),
            (p + "ln_1.weight", (C,), -1, False, None, 1),
            (p + "ln_1.bias", (C,), 0, False, None, 1),
            (p + "attn.c_attn.bias", (3 * C,), 0, False, 0, 3),
            (p + "attn.c_proj.bias", (C,), 0, False, None, 1),
            (p + "ln_2.weight", (C,), -1, False, None, 1),
            (p + "ln_2.bias", (C,), 0, False, None, 1),
            (p + "mlp.c_fc.bias", (4 * C,), 0, False, 0, 1),
            (p + "mlp.c_proj.bias", (C,), 0, False, None, 1),
        ]
    rows += [("ln_f.weight", (C,), -1, False, None, 1), ("ln_f.bias", (C,), 0, False, None, 1)]
    specs, offset = [], 0
    for name, shape, init_std, decay, tp_axis, tp_blocks in rows:
        local = list(shape)
        if tp_axis is not None:
            local[tp_axis] //= tp
        spec = ParamSpec(name, shape, offset, init_std, decay, tp_axis, tp_blocks, tuple(local))
        specs.append(spec)
        offset += spec.size
    return specs


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted [start, stop) ranges with touching neighbours merged."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


def init_tensor(spec: ParamSpec, seed: int, vocab_size: int) -> np.ndarray:
    """The full tensor for `spec`, from a stream keyed by (seed, name): the same whatever the layout or backend."""
    if spec.init_std == 0:
        return np.zeros(spec.shape)
    if spec.init_std == -1:
        return np.ones(spec.shape)
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    t = rng.standard_normal(spec.shape) * spec.init_std
    if spec.name == "wte.weight":
        t[vocab_size:] = 0  # pad rows: never a target, masked out of the softmax
    return t


class KVCache:
    """Keys and values of the positions decoded so far, per layer: (B, H, block_size, hd) each."""

    def __init__(self, model: "GPT", batch: int):
        cfg = model.cfg
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, 2, batch, model.heads, cfg.block_size, hd)
        self.kv = model.xp.zeros(shape, dtype=model.dtype)
        self.length = 0


class GPT:
    """GPT-2 on one rank of a tensor-parallel group (`tp_comm`; none: the whole model on this process).

    A rank holds its shard of every split tensor (heads of qkv and the MLP, rows of the projections, a slice of the
    vocabulary) and a full copy of the rest; the f/g mappings of tensor_parallel.py join them.
    """

    def __init__(self, cfg: ModelConfig, xp=np, seed: int | None = 0, tp_comm: Comm | None = None):
        if cfg.vocab_size <= 0:
            raise UserError("model.vocab_size: expected a positive integer (set it, or prepare data first)")
        self.cfg = cfg
        self.xp = xp
        self.tp = tp_comm if tp_comm is not None else Comm(None)
        self.dtype = np.dtype(cfg.dtype)
        self.specs = param_specs(cfg, self.tp.size)
        self.spec = {s.name: s for s in self.specs}
        self.num_params = sum(math.prod(s.shape) for s in self.specs)  # the whole model's
        self.local_size = sum(s.size for s in self.specs)  # this rank's flat buffer
        self.heads = cfg.n_head // self.tp.size  # this rank's attention heads
        self.v0 = self.tp.rank * self.spec["wte.weight"].local_shape[0]  # first vocabulary row held here
        self.flat = xp.zeros(self.local_size, dtype=self.dtype)
        self.grad_flat = xp.zeros(self.local_size, dtype=self.dtype)
        self.params = {s.name: self.flat[s.offset:s.offset + s.size].reshape(s.local_shape) for s in self.specs}
        self.grads = {s.name: self.grad_flat[s.offset:s.offset + s.size].reshape(s.local_shape) for s in self.specs}
        self._cache = None
        if seed is not None:
            self.init_weights(seed)

    # -- parameters ----------------------------------------------------------------------------------------------------

    def local_view(self, flat, spec: ParamSpec):
        """spec's shard inside a flat buffer laid out like self.flat (parameters, gradients, Adam moments)."""
        return flat[spec.offset:spec.offset + spec.size].reshape(spec.local_shape)

    def shard(self, full: np.ndarray, spec: ParamSpec) -> np.ndarray:
        return TP.shard(full, spec, self.tp.size, self.tp.rank)

    def init_weights(self, seed: int) -> None:
        """Each rank makes the full tensor and keeps its shard: the same logical model on any layout."""
        for s in self.specs:
            full = init_tensor(s, seed, self.cfg.vocab_size).astype(self.dtype)
            self.params[s.name][...] = to_device(self.shard(full, s), self.xp)

    def check_shapes(self, shapes: dict, what: str = "parameters") -> None:
        """shapes: {name: full shape} of a source of tensors; it must hold exactly this model's, in its shapes."""
        missing = [n for n in self.spec if n not in shapes]
        extra = [n for n in shapes if n not in self.spec]
        if missing or extra:
            raise UserError(f"{what} do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, shape in shapes.items():
            if tuple(shape) != self.spec[name].shape:
                raise UserError(f"{what}: {name} has shape {tuple(shape)}, the config gives {self.spec[name].shape}")

    def load_flat(self, flat, tensors: dict, what: str = "parameters") -> None:
        """Copy named full tensors into a flat buffer laid out like self.flat, each rank taking its shard."""

        def read(name, index, out=None):
            part = np.asarray(tensors[name])[index]
            if out is None:
                return part
            out[...] = part
            return out

        self.read_flat(flat, read, {n: np.shape(t) for n, t in tensors.items()}, what)

    def read_flat(self, flat, read, shapes: dict, what: str, ranges=None) -> None:
        """Fill this rank's shards in a flat buffer laid out like self.flat from a reader of full tensors:
        read(name, index, out=None) returns full[index] for a hyperslab index (an HDF5 dataset's slicing), into
        `out` when given (whole rows of a single slab are read straight into the buffer), and only the rows of this
        rank's shards that cover `ranges` of the flat buffer are read (default: all of it; ZeRO-1: the ranges this
        rank owns). shapes: {name: full shape} of what the source holds, checked first."""
        self.check_shapes(shapes, what)
        for s in self.specs:
            row = s.size // s.local_shape[0]  # elements per row (along axis 0) of the local shard
            dest = self.local_view(flat, s).reshape(-1)
            slabs = TP.shard_slices(s.shape, s.tp_axis, s.tp_blocks, self.tp.size, self.tp.rank)
            for a, b in ranges if ranges is not None else [(0, self.local_size)]:
                lo, hi = max(a, s.offset) - s.offset, min(b, s.offset + s.size) - s.offset
                if lo >= hi:
                    continue
                r0, r1 = lo // row, -(-hi // row)
                if (self.xp is np and lo == r0 * row and hi == r1 * row and len(slabs) == 1
                        and (s.tp_axis != 0 or self.tp.size == 1)):  # whole rows of one slab: read in place
                    read(s.name, (slice(r0, r1),) + slabs[0][1:], dest[lo:hi].reshape((r1 - r0,) + s.local_shape[1:]))
                    continue
                rows = self._read_local_rows(read, s, slabs, r0, r1).reshape(-1)
                dest[lo:hi] = to_device(np.asarray(rows[lo - r0 * row:hi - r0 * row], dtype=self.dtype), self.xp)

    def _read_local_rows(self, read, s: ParamSpec, slabs: list, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of this rank's shard of s (its `slabs`, TP.shard_slices), read as hyperslabs of the full
        tensor."""
        if s.tp_axis != 0 or self.tp.size == 1:  # axis 0 whole: the rows, times this rank's slab(s) of the split axis
            pieces = [read(s.name, (slice(r0, r1),) + slab[1:]) for slab in slabs]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=s.tp_axis)
        rows = np.concatenate([np.arange(slab[0].start, slab[0].stop) for slab in slabs])[r0:r1]
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)  # contiguous runs of full-tensor rows
        return np.concatenate([read(s.name, (slice(int(run[0]), int(run[-1]) + 1),)) for run in runs])

    def load_state(self, tensors: dict) -> None:
        self.load_flat(self.flat, tensors)

    def full_tensors(self, flat, copy: bool = True) -> dict:
        """{name: full tensor} (host arrays) from a flat buffer laid out like self.flat: the shards of the TP group
        are gathered (one allgather of the flat buffer) and put back together. Every TP rank gets the result.
        copy=False: tensors that need no reassembly are views of the (host) buffer, valid while it is unchanged."""
        P = self.tp.size
        host = to_host(flat)
        if P > 1:
            every = np.empty((P, host.size), dtype=host.dtype)
            every[self.tp.rank] = host
            self.tp.allgather_(every.reshape(-1), [host.size] * P)
        out = {}
        for s in self.specs:
            if P == 1 or s.tp_axis is None:
                view = host[s.offset:s.offset + s.size].reshape(s.shape)
                out[s.name] = view.copy() if copy else view
                continue
            full = np.empty(s.shape, dtype=host.dtype)
            for r in range(P):
                full[TP.shard_index(s.shape, s.tp_axis, s.tp_blocks, P, r)] = \
                    every[r, s.offset:s.offset + s.size].reshape(s.local_shape)
            out[s.name] = full
        return out

    def decay_ranges(self) -> list[tuple[int, int]]:
        """Contiguous [start, stop) ranges of the flat buffer that get weight decay."""
        return merge_ranges((s.offset, s.offset + s.size) for s in self.specs if s.decay)

    def replicated_ranges(self) -> list[tuple[int, int]]:
        """Ranges of the flat buffer holding tensors every TP rank has in full (counted once in a global norm)."""
        return merge_ranges((s.offset, s.offset + s.size) for s in self.specs if s.tp_axis is None)

    def flops_per_token(self, T: int | None = None) -> float:
        """6N + 12 L T C (nanoGPT/PaLM), N without the position embedding."""
        c = self.cfg
        T = c.block_size if T is None else T
        n = self.num_params - math.prod(self.spec["wpe.weight"].shape)
        return 6 * n + 12 * c.n_layer * T * c.n_embd

    def _block(self, i: int) -> dict:
        p = f"h.{i}."
        return {k[len(p):]: (self.params[k], self.grads[k]) for k in self.params if k.startswith(p)}

    # -- training forward / backward -----------------------------------------------------------------------------------

    def check_tokens(self, idx, pos0: int = 0) -> None:
        T = idx.shape[1]
        if pos0 + T > self.cfg.block_size:
            raise UserError(f"sequence length {pos0 + T} exceeds model.block_size={self.cfg.block_size}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = hi if hi >= self.cfg.vocab_size else lo
            raise UserError(f"token id {bad} outside the vocabulary [0, {self.cfg.vocab_size})")

    def _head_rng(self, rng):
        """Attention's dropout draws for this rank's heads: a DropoutRNG's view (layout-independent masks)."""
        h0 = self.tp.rank * self.heads
        return rng.for_heads(h0, h0 + self.heads, self.cfg.n_head) if isinstance(rng, L.DropoutRNG) else rng

    def forward(self, idx, targets=None, rng=None, keep_cache: bool = False):
        """idx (B, T) int -> logits (B, T, vocab) if targets is None, else the mean cross-entropy loss (a float).
        keep_cache=True keeps what backward needs (training); dropout applies only then and needs rng (a
        layers.DropoutRNG for this rank's rows, or any Generator).
        Tensor parallel: f (copy_to_tp_region) before each column-parallel layer, g (reduce_from_tp_region) after
        each row-parallel one, a vocabulary-parallel embedding and loss."""
        cfg, P, tp = self.cfg, self.params, self.tp
        B, T = idx.shape
        drop = cfg.dropout if keep_cache else 0.0
        x = TP.vocab_parallel_embedding_forward(P["wte.weight"], P["wpe.weight"], idx, self.v0, tp)
        emb_mask = None
        if drop > 0:
            x, emb_mask = L.dropout_forward(x, drop, rng)
        blocks = []
        for i in range(cfg.n_layer):
            p = self._block(i)
            h1, ln1 = L.layernorm_forward(x, p["ln_1.weight"][0], p["ln_1.bias"][0])
            h1 = TP.copy_to_tp_region(h1, tp)
            qkv = L.linear_forward(h1, p["attn.c_attn.weight"][0], p["attn.c_attn.bias"][0])  # column-parallel
            y, att = L.attention_forward(qkv, self.heads, drop, self._head_rng(rng) if drop > 0 else None)
            del qkv
            a = L.linear_forward(y, p["attn.c_proj.weight"][0], None)  # row-parallel: partial sums, bias after g
            a = TP.reduce_from_tp_region(a, tp)
            a += p["attn.c_proj.bias"][0]
            a_mask = None
            if drop > 0:
                a, a_mask = L.dropout_forward(a, drop, rng)
            x += a  # the residual input is not needed again: LayerNorm's cache holds its normalised copy
            h2, ln2 = L.layernorm_forward(x, p["ln_2.weight"][0], p["ln_2.bias"][0])
            h2 = TP.copy_to_tp_region(h2, tp)
            f = L.linear_forward(h2, p["mlp.c_fc.weight"][0], p["mlp.c_fc.bias"][0])  # column-parallel
            g, gt = L.gelu_forward(f)
            m = L.linear_forward(g, p["mlp.c_proj.weight"][0], None)  # row-parallel
            m = TP.reduce_from_tp_region(m, tp)
            m += p["mlp.c_proj.bias"][0]
            m_mask = None
            if drop > 0:
                m, m_mask = L.dropout_forward(m, drop, rng)
            x += m
            if keep_cache:
                blocks.append((ln1, h1, att, y, a_mask, ln2, h2, f, gt, g, m_mask))
        xf, lnf = L.layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"])
        xf2 = TP.copy_to_tp_region(xf.reshape(B * T, cfg.n_embd), tp)
        logits = xf2 @ P["wte.weight"].T  # tied head, vocabulary-parallel: this rank's columns
        if targets is None:
            logits = TP.gather_from_tp_region(logits, tp)
            return logits.reshape(B, T, -1)[:, :, :cfg.vocab_size]
        loss, ce = TP.vocab_parallel_cross_entropy_forward(logits, targets.reshape(-1), cfg.vocab_size, self.v0, tp)
        if keep_cache:
            self._cache = (idx, emb_mask, blocks, lnf, xf2, ce)
        return loss

    def backward(self, loss_scale: float = 1.0, accumulate: bool = False, grad_ready=None) -> None:
        """Gradients of loss_scale * (the last forward's loss) into `self.grads`; accumulate=False overwrites them.
        grad_ready(offset), if given, is called as soon as every gradient from `offset` to the end of the flat
        buffer is final (after ln_f and after each block, from the last), so data-parallel buckets can start
        reducing early; when backward returns, all are final."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(..., keep_cache=True) first")
        cfg, P, G, tp = self.cfg, self.params, self.grads, self.tp
        idx, emb_mask, blocks, lnf, xf2, ce = self._cache
        self._cache = None
        B, T = idx.shape
        acc = accumulate
        ready = grad_ready or (lambda offset: None)
        dlogits = TP.vocab_parallel_cross_entropy_backward(ce, loss_scale)
        L._matmul_into(dlogits.T, xf2, G["wte.weight"], acc)  # tied head: wte gets the head's gradient first
        dx = TP.copy_to_tp_region_backward(dlogits @ P["wte.weight"], tp).reshape(B, T, cfg.n_embd)
        del dlogits, ce
        dx = L.layernorm_backward(dx, lnf, P["ln_f.weight"], G["ln_f.weight"], G["ln_f.bias"], acc)
        ready(self.spec["ln_f.weight"].offset)
        for i in reversed(range(cfg.n_layer)):
            p = self._block(i)
            ln1, h1, att, y, a_mask, ln2, h2, f, gt, g, m_mask = blocks.pop()
            dm = dx if m_mask is None else L.dropout_backward(dx.copy(), m_mask)
            dm = TP.reduce_from_tp_region_backward(dm, tp)
            dg = L.linear_backward(dm, g, *p["mlp.c_proj.weight"], p["mlp.c_proj.bias"][1], acc)
            df = L.gelu_backward(dg, f, gt)
            dh2 = L.linear_backward(df, h2, *p["mlp.c_fc.weight"], p["mlp.c_fc.bias"][1], acc)
            dh2 = TP.copy_to_tp_region_backward(dh2, tp)
            dx += L.layernorm_backward(dh2, ln2, *p["ln_2.weight"], p["ln_2.bias"][1], acc)
            da = dx if a_mask is None else L.dropout_backward(dx.copy(), a_mask)
            da = TP.reduce_from_tp_region_backward(da, tp)
            dy = L.linear_backward(da, y, *p["attn.c_proj.weight"], p["attn.c_proj.bias"][1], acc)
            dqkv = L.attention_backward(dy, att, self.heads)
            dh1 = L.linear_backward(dqkv, h1, *p["attn.c_attn.weight"], p["attn.c_attn.bias"][1], acc)
            dh1 = TP.copy_to_tp_region_backward(dh1, tp)
            dx += L.layernorm_backward(dh1, ln1, *p["ln_1.weight"], p["ln_1.bias"][1], acc)
            ready(self.spec[f"h.{i}.attn.c_attn.weight"].offset)  # the block's first tensor
        if emb_mask is not None:
            L.dropout_backward(dx, emb_mask)
        TP.vocab_parallel_embedding_backward(dx, idx, self.v0, G["wte.weight"], G["wpe.weight"], acc, tp)
        # the embeddings' gradients (offset 0) are final only now, when nothing is left to overlap with: the caller
        # reduces what remains after backward returns

    # -- a small API for scripts and notebooks -------------------------------------------------------------------------

    def logits(self, idx):
        idx = self.xp.asarray(idx)
        self.check_tokens(idx)
        return self.forward(idx)

    def loss(self, idx, targets) -> float:
        idx, targets = self.xp.asarray(idx), self.xp.asarray(targets)
        self.check_tokens(idx)
        self.check_tokens(targets)
        return self.forward(idx, targets)

    def gradients(self, idx, targets) -> dict:
        """{name: gradient} of the mean loss on (idx, targets), without dropout; copies, safe to keep."""
        idx, targets = self.xp.asarray(idx), self.xp.asarray(targets)
        self.check_tokens(idx)
        self.check_tokens(targets)
        dropout, self.cfg.dropout = self.cfg.dropout, 0.0
        try:
            self.forward(idx, targets, keep_cache=True)
            self.backward()
        finally:
            self.cfg.dropout = dropout
        return {name: g.copy() for name, g in self.grads.items()}

    # -- incremental decoding ------------------------------------------------------------------------------------------

    def forward_cached(self, idx, cache: KVCache):
        """Logits (B, Tn, vocab) for the new tokens idx (B, Tn) at positions cache.length.., updating the cache.
        Equal to the matching rows of a full forward over all tokens so far."""
        xp, cfg, P, tp = self.xp, self.cfg, self.params, self.tp
        B, Tn = idx.shape
        pos0 = cache.length
        if pos0 + Tn > cfg.block_size:
            raise UserError(f"sequence length {pos0 + Tn} exceeds model.block_size={cfg.block_size}")
        end = pos0 + Tn
        x = TP.vocab_parallel_embedding_forward(P["wte.weight"], P["wpe.weight"], idx, self.v0, tp, pos0)
        for i in range(cfg.n_layer):
            p = self._block(i)
            h1, _ = L.layernorm_forward(x, p["ln_1.weight"][0], p["ln_1.bias"][0])
            qkv = L.linear_forward(TP.copy_to_tp_region(h1, tp), p["attn.c_attn.weight"][0], p["attn.c_attn.bias"][0])
            qkvh = L.split_heads(qkv, self.heads)
            kv = cache.kv[i]
            kv[0, :, :, pos0:end] = qkvh[1]
            kv[1, :, :, pos0:end] = qkvh[2]
            q = qkvh[0] * (1.0 / math.sqrt(qkvh.shape[-1]))
            att = L.causal_softmax_(q @ kv[0, :, :, :end].transpose(0, 1, 3, 2))
            y = xp.ascontiguousarray(L.merge_heads(att @ kv[1, :, :, :end]))
            x += TP.reduce_from_tp_region(L.linear_forward(y, p["attn.c_proj.weight"][0], None), tp)
            x += p["attn.c_proj.bias"][0]
            h2, _ = L.layernorm_forward(x, p["ln_2.weight"][0], p["ln_2.bias"][0])
            f = L.linear_forward(TP.copy_to_tp_region(h2, tp), p["mlp.c_fc.weight"][0], p["mlp.c_fc.bias"][0])
            g, _ = L.gelu_forward(f)
            x += TP.reduce_from_tp_region(L.linear_forward(g, p["mlp.c_proj.weight"][0], None), tp)
            x += p["mlp.c_proj.bias"][0]
        cache.length = end
        xf, _ = L.layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"])
        logits = TP.copy_to_tp_region(xf.reshape(B * Tn, cfg.n_embd), tp) @ P["wte.weight"].T
        logits = TP.gather_from_tp_region(logits, tp)
        return logits.reshape(B, Tn, -1)[:, :, :cfg.vocab_size]
