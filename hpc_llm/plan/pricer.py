"""What one rank's setting pays for each kind of work: the cluster's figures bound to a matmul dtype, a TP group and
its link, the 2-byte format's conversions and the ranks sharing a device (Pricer), and the seconds of one operation
(Cost). plan/compute.py prices each layer's inventory with it."""

from __future__ import annotations

from dataclasses import dataclass

from hpc_llm.kernels.dispatch import AUTO_MIN_ELEMENTS
from hpc_llm.kernels.gemm import onednn_size
from hpc_llm.kernels.rounding import PIECE as ROUND_PIECE
from hpc_llm.model.attention import held_size
from hpc_llm.plan.cluster import Cluster


@dataclass
class Cost:
    """Seconds of one operation: compute (matmuls + elementwise) and blocking tensor-parallel communication."""

    compute: float = 0.0
    tp: float = 0.0
    gemm: float = 0.0  # of compute: matmuls only

    def __add__(self, o: Cost) -> Cost:
        return Cost(self.compute + o.compute, self.tp + o.tp, self.gemm + o.gemm)

    @property
    def total(self) -> float:
        return self.compute + self.tp


class Pricer:
    """The figures bound to one rank's setting: matmul dtype, bytes per element, TP group and its link (already
    shared, see predict._link), how many ranks share one device (oversubscription: compute slows by that factor),
    and low: the 2-byte format of bf16/fp16 ("bfloat16" | "float16"; None in fp32/fp64: no conversions).
    sp: sequence parallelism (the TP allreduces of activations become all-gathers and reduce-scatters, LayerNorm,
    dropout and the residual stream work on the slice). comm_low: the 16-bit format activation collectives travel
    in (parallel.act_comm; None: the compute dtype): half the bytes, and a conversion each way."""

    def __init__(
        self,
        cl: Cluster,
        dtype: str,
        itemsize: int,
        tp: int,
        tp_link,
        share: float = 1.0,
        low: str | None = None,
        sp: bool = False,
        comm_low: str | None = None,
        zero3: bool = False,
    ):
        self.cl, self.dtype, self.it = cl, dtype, itemsize
        self.tp, self.link, self.share = tp, tp_link, share
        self.low, self.sp, self.comm_low, self.zero3 = low, sp, comm_low, zero3
        # bf16 on a CPU whose products run on oneDNN's bf16 GEMM (kernels/gemm.py): the large ones at its rate
        self.onednn = cl.reads_bf16 and dtype == "float32" and low == "bfloat16"

    @property
    def comm_it(self) -> int:
        """Bytes per element of an activation collective."""
        return 2 if self.comm_low else self.it

    def gemm(self, m: int, n: int, k: int, batch: int = 1, held: bool = False) -> Cost:
        """`batch` products (m x k) @ (k x n) at the matmul dtype's rate; where the products run on oneDNN
        (self.onednn) those large enough for it (kernels/gemm.onednn_size; held: both operands bfloat16 arrays) at
        the bfloat16 rate, as gemm.matmul decides."""
        dtype = self.dtype
        if self.onednn and onednn_size(m * n * k, min(m, n), held):
            dtype = "bfloat16"
        t = self.share * self.cl.gemm_time(dtype, m, n, k, batch)
        return Cost(t, 0.0, t)

    @property
    def gemm16(self) -> bool:
        """Whether the linear layers' and the tied head's products take 16-bit operands (a device with a 16-bit
        format: gemm16 reads the 2-byte compute copy and kept inputs, kernels/cuda/gemm16.py; not under ZeRO-3,
        whose compute copy stays float32: model/gpt.compute_16_bit)."""
        return self.cl.backend == "cupy" and self.low is not None and not self.zero3

    def linear(self, m: int, n: int, k: int) -> Cost:
        """A linear layer's or the head's product: with gemm16 at the format's rate, else gemm."""
        if self.gemm16:
            t = self.share * self.cl.gemm_time(self.low, m, n, k)
            return Cost(t, 0.0, t)
        return self.gemm(m, n, k)

    def weight_linear(self, m: int, n: int, k: int) -> Cost:
        """A weight gradient's product (W): on oneDNN without sequence parallelism both operands are bfloat16
        arrays (the kept input and the output gradient as the code holds them: Precision.gemm_use,
        gemm_operand), so the lower cut-over for held operands applies; with sp one of them is gathered in
        float32. Elsewhere linear."""
        if self.onednn and not self.sp:
            return self.gemm(m, n, k, held=True)
        return self.linear(m, n, k)

    def held(self, T: int, hd: int) -> bool:
        """Whether attention's per-head products at T positions and head size hd take both operands as bfloat16
        arrays (model/attention._reads_low: gemm.takes_held)."""
        return self.onednn and onednn_size(*held_size(T, hd), True)

    # Precision's conversions (model/precision.py), nothing without a 2-byte format
    def _cast(self, elems: float, to_low: bool, calls: float = 1.0) -> Cost:
        if self.low is None or elems == 0:
            return Cost()
        return Cost(self.share * self.cl.cast_time(self.low, to_low, elems, calls))

    def keep(self, elems: float) -> Cost:
        """Precision.keep: an activation stored in the format."""
        return self._cast(elems, True)

    def use(self, elems: float) -> Cost:
        """Precision.use: a kept activation back in float32."""
        return self._cast(elems, False)

    def operand(self, elems: float) -> Cost:
        """Precision.operand: rounded to the format and back, in a new array."""
        return self._cast(elems, True) + self._cast(elems, False)

    def round_(self, elems: float) -> Cost:
        """Precision.round_: in place, a piece at a time (each piece there and back)."""
        # on a device in one piece (Precision.round_)
        pieces = 1 if self.cl.backend == "cupy" else max(1, -(-int(elems) // ROUND_PIECE))
        return self._cast(elems, True, pieces) + self._cast(elems, False, pieces)

    def fused(self, elems: int) -> bool:
        """Whether bf16's compiled kernels on the host write and read the format in their own passes on arrays of
        elems (GELU's, attention's head layout: kernels/bias_gelu.py, rounding.heads_rounded; from
        dispatch.AUTO_MIN_ELEMENTS), instead of the conversions after and before them."""
        return self.low == "bfloat16" and self.cl.backend != "cupy" and elems >= AUTO_MIN_ELEMENTS

    def kernel(self, name: str, elems: float, passes: Cost) -> Cost:
        """A call of the kernel layer (plan/cluster.KERNELS) over elems elements: at the cluster's measured rate for
        it where the file has one and the step is float32 on the host (the figures are float32 calls), else
        `passes`, its NumPy passes as the inventory counts them (bf16's conversions, fused or not, stay there)."""
        cl = self.cl
        if name not in cl.kernels or self.low is not None or self.it != 4 or cl.backend == "cupy":
            return passes
        return Cost(self.share * cl.kernel_time(name, elems))

    def ew(self, accesses: float, elems: float, calls: float = 1.0) -> Cost:
        return Cost(self.share * self.cl.pass_time(accesses, self.it, elems, calls))

    def chunked(
        self,
        accesses_per_elem: float,
        elems: int,
        calls_per_chunk: int,
        chunk: int,
        numpy_only: bool = False,
    ) -> Cost:
        """A chain of passes run chunk by chunk in cache (GELU, AdamW, the norm); numpy_only: on CuPy one chunk
        (kernels/bias_gelu._chunks)."""
        if numpy_only and self.cl.backend == "cupy":
            chunk = max(elems, 1)
        n_chunks = max(1, -(-elems // chunk))
        return self.ew(accesses_per_elem * elems, min(chunk, elems), calls_per_chunk * n_chunks)

    def exp(self, elems: float) -> Cost:
        return Cost(self.share * (elems / self.cl.transcendental_rate + self.cl.call_s))

    def scatter(self, rows_elems: float) -> Cost:
        return Cost(self.share * (rows_elems / self.cl.scatter_rate + self.cl.call_s))

    def allreduce(self, nbytes: float) -> Cost:
        """A TP allreduce of nbytes as they are (the cross-entropy's row statistics)."""
        if self.tp == 1:
            return Cost()
        return Cost(0.0, self.link.seconds("allreduce", nbytes, self.tp))

    def _kind(self, plain: str, wire: str) -> str:
        """The collective an activation's transfer makes: the fp32 call, or on the 16-bit wire wire16.py's."""
        return wire if self.comm_low else plain

    def _comm_casts(self, to_elems: float, back_elems: float) -> Cost:
        """16-bit transfers: the elements rounded to the format before sending, and those received widened."""
        if self.comm_low is None or self.tp == 1:
            return Cost()
        cl = self.cl
        return Cost(
            self.share
            * (
                cl.cast_time(self.comm_low, True, to_elems)
                + cl.cast_time(self.comm_low, False, back_elems)
            )
        )

    def act_allreduce(self, elems: int) -> Cost:
        """An f/g allreduce of an activation or its gradient (elems on every rank), at act_comm's bytes."""
        if self.tp == 1:
            return Cost()
        nbytes = elems * self.comm_it
        kind = self._kind("allreduce", "allreduce16")
        t = self.link.seconds(kind, nbytes, self.tp, nonblocking=False)
        return Cost(0.0, t) + self._comm_casts(elems, elems)

    def allgather(self, elems: int) -> Cost:
        """Sequence parallel: the (b, T, C) whole of elems elements from each rank's slice."""
        nbytes = elems * self.comm_it
        kind = self._kind("allgather_along", "iallgatherv")
        t = self.link.seconds(kind, nbytes, self.tp, nonblocking=False)
        return Cost(0.0, t) + self._comm_casts(elems // self.tp, elems)

    def reduce_scatter(self, elems: int) -> Cost:
        """Sequence parallel: the (b, T, C) partials of elems elements summed, each rank keeping its slice."""
        nbytes = elems * self.comm_it
        kind = self._kind("reduce_scatter_along", "ialltoallv")
        t = self.link.seconds(kind, nbytes, self.tp, nonblocking=False)
        return Cost(0.0, t) + self._comm_casts(elems, elems // self.tp)

    def kept_allgather(self, elems: int) -> Cost:
        """Sequence parallel: a kept 16-bit input slice gathered whole. On a device its bits travel (2 bytes an
        element, no wire conversions: tensor_parallel._gather_kept); elsewhere as allgather."""
        if self.low is None or self.cl.backend != "cupy":
            return self.allgather(elems)
        return Cost(0.0, self.link.seconds("allgather_along", elems * 2, self.tp))

    def gathered_operand(self, elems: int) -> Cost:
        """A row-parallel layer's output gradient as an operand: rounded, after (sp) its gather; on a device with a
        16-bit format and sp, each slice rounded and its bits gathered (the conversions are counted: tensor_parallel.
        _gathered_operand)."""
        if not self.sp:
            return self.operand(elems)
        if self.low is None or self.cl.backend != "cupy":
            return self.allgather(elems) + self.operand(elems)
        return self.kept_allgather(elems)

    def enter_column(self, n: int) -> Cost:
        """Into a column-parallel layer in forward (f): the identity, or with sp the slice all-gathered."""
        return self.allgather(n) if self.sp else Cost()

    def leave_row(self, n: int) -> Cost:
        """Out of a row-parallel layer in forward (g): allreduce, or with sp reduce-scatter."""
        return self.reduce_scatter(n) if self.sp else self.act_allreduce(n)

    def column_input_grad(self, n: int) -> Cost:
        """A column-parallel layer's input gradient (f's backward): allreduce, or with sp reduce-scatter."""
        return self.reduce_scatter(n) if self.sp else self.act_allreduce(n)
