"""A pipeline stage assembled from modules.py's and ends.py's parts: Chunk ([embedding] + blocks + [head]), its
forward and its backward in one piece or as B and W (zero-bubble schedules), recompute, and the hooks run around
each part (PartHooks: ZeRO's gathers and reduce-scatters, parallel/zero.py).
"""

from __future__ import annotations

from typing import NamedTuple

from hpc_llm.model.ends import Embedding, Head
from hpc_llm.model.layers import DropoutRNG, WeightWork
from hpc_llm.model.modules import Block


class PartHooks:
    """What runs around each part of a chunk (its embedding, each block, its head: parts "embedding", the layer
    index, "head"): nothing, unless the parameters or gradients are sharded over data parallelism: ZeRO-3 gathers a
    part's parameters before it runs and frees them after, ZeRO-2/3 reduce-scatter the gradients a part finished
    (parallel/zero.py)."""

    def before_forward(self, chunk, part) -> None:
        pass

    def after_forward(self, chunk, part, backward_follows: bool) -> None:
        pass

    def before_backward(self, chunk, part) -> None:
        pass

    def after_backward(self, chunk, part) -> None:
        pass


NO_HOOKS = PartHooks()


class ChunkCache(NamedTuple):
    """What Chunk.backward needs from its forward."""

    embedding: tuple | None  # the embedding's cache (first stage)
    blocks: list  # per block: its BlockCache, or its input under recompute
    head: tuple | None  # the head's cache (last stage, with targets)
    rng: object  # the dropout rng, to draw the same masks again under recompute


class Chunk:
    """One (virtual) pipeline stage: [embedding] + blocks + [head]. Its forward takes token ids on the first stage,
    else the previous stage's activations, and gives the loss on the last stage (logits without targets), else its
    activations; its backward takes the gradient of those activations (None on the last stage) and gives that of
    its input (None on the first). grad_offsets: for the head and each block, where its parameters start in the flat
    buffer; backward calls grad_ready(offset) once each one's gradients are final (data-parallel buckets start).
    backward_input and backward_weight are backward's two parts (zero-bubble schedules), B of every part then W of
    every part, in the same order (head, blocks from the last, embedding); backward runs each part's W right after its
    B, so the two give the same bits.

    recompute "block" (Megatron's full recompute): forward keeps only each block's input, and backward runs the
    block's forward again from it to get the cache; the same arithmetic on the same input gives the same cache bit
    for bit, and a DropoutRNG's sites draw the same masks again. "selective" (Megatron's selective recompute, built
    into the blocks): each block keeps all but attention's probabilities and masks and GELU's tanh, which its
    backward recomputes from the kept q, k, v and GELU input; "none"."""

    def __init__(
        self,
        vstage: int,
        embedding: Embedding | None,
        blocks: list[Block],
        head: Head | None,
        grad_offsets: dict,
        recompute: str = "none",
    ):
        self.vstage, self.embedding, self.blocks, self.head = vstage, embedding, blocks, head
        self.grad_offsets = grad_offsets  # {"head": offset, layer index: offset}
        self.recompute = recompute
        self.hooks = NO_HOOKS  # parallel/zero.py installs its own

    def parts(self) -> list:
        """This chunk's parts in forward order: "embedding", the layer indices, "head"."""
        return (
            (["embedding"] if self.embedding else [])
            + [b.layer for b in self.blocks]
            + (["head"] if self.head else [])
        )

    def forward(self, inp, targets=None, rng=None, keep_cache: bool = True):
        recompute = keep_cache and self.recompute == "block"
        if (
            keep_cache
            and self.recompute != "none"
            and rng is not None
            and not isinstance(rng, DropoutRNG)
            and self.blocks[0].dropout > 0
        ):
            raise ValueError(
                "recompute with dropout needs a layers.DropoutRNG (its masks can be drawn again)"
            )
        hooks = self.hooks
        x, emb_cache = inp, None
        if self.embedding:
            hooks.before_forward(self, "embedding")
            x, emb_cache = self.embedding.forward(inp, rng)
            hooks.after_forward(self, "embedding", keep_cache)
        caches = []
        for block in self.blocks:
            if recompute:
                caches.append(x.copy())  # the block updates its input in place
            hooks.before_forward(self, block.layer)
            x, cache = block.forward(x, rng)
            hooks.after_forward(self, block.layer, keep_cache)
            if keep_cache and not recompute:
                caches.append(cache)
        if self.head is None:
            return x, ChunkCache(emb_cache, caches, None, rng)
        hooks.before_forward(self, "head")
        out, head_cache = self.head.forward(x, targets)
        hooks.after_forward(self, "head", keep_cache)
        return out, ChunkCache(emb_cache, caches, head_cache, rng)

    def backward(
        self,
        dout,
        cache: ChunkCache,
        loss_scale: float = 1.0,
        accumulate: bool = False,
        grad_ready=None,
    ):
        """The input gradient (None on the first stage), every gradient written: part by part, each part's W right
        after its B (the unsplit backward)."""
        dx, _ = self._backward(dout, cache, loss_scale, accumulate, grad_ready)
        return dx

    def backward_input(
        self, dout, cache: ChunkCache, loss_scale: float = 1.0, *, head_accumulate: bool
    ):
        """B alone (zero-bubble schedules): -> (the input gradient, the W left for backward_weight). The head's W
        runs here at once (head_accumulate: add to its gradients, else overwrite them), as Qi et al. do on the last
        stage: kept for later it would hold the logits' gradient (rows x T x V / tp) until W, above 1F1B's memory at
        a large vocabulary, to save a GEMM the size of the head's B; backward_weight still reports it ready."""
        return self._backward(dout, cache, loss_scale, None, None, head_accumulate)

    def backward_weight(self, weights: list, accumulate: bool, grad_ready=None) -> None:
        """W of one micro-batch, part by part in backward's order; grad_ready as in backward."""
        for offset, work in weights:
            work.run(accumulate)
            if offset is not None and grad_ready is not None:
                grad_ready(offset)

    def _backward(self, dout, cache: ChunkCache, loss_scale, accumulate, grad_ready, head_acc=None):
        """The parts' B from the head to the embedding. accumulate None: each part's W kept (the head's run with
        head_acc), returned as [(its grad offset, WeightWork)]; else run with it, grad_ready(offset) after each
        part."""
        emb_cache, caches, head_cache, rng = cache
        weights, hooks = [], self.hooks

        def done(part, offset, work):
            # a deferred W (zero-bubble) leaves the part's gradients unfinished: the hooks (ZeRO-2/3, which those
            # schedules do not run with) and grad_ready wait for backward_weight
            if work.deferred:
                weights.append((offset, work))
                return
            hooks.after_backward(self, part)
            if offset is not None and grad_ready is not None:
                grad_ready(offset)

        dx = dout
        if self.head is not None:
            work = WeightWork(accumulate if accumulate is not None else head_acc)
            hooks.before_backward(self, "head")
            dx = self.head.backward_input(head_cache, loss_scale, work)
            if accumulate is None:
                # done, but reported ready by backward_weight, in the unsplit order
                weights.append((self.grad_offsets["head"], work))
            else:
                done("head", self.grad_offsets["head"], work)
        for block in reversed(self.blocks):
            block_cache = caches.pop()
            hooks.before_backward(self, block.layer)
            if self.recompute == "block":
                _, block_cache = block.forward(block_cache, rng)
            work = WeightWork(accumulate)
            dx = block.backward_input(dx, block_cache, work, rng)
            done(block.layer, self.grad_offsets[block.layer], work)
        if self.embedding is not None:
            work = WeightWork(accumulate)
            hooks.before_backward(self, "embedding")
            self.embedding.backward_input(dx, emb_cache, work)
            done("embedding", None, work)
            dx = None
        return dx, weights
