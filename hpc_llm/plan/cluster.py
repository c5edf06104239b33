"""A machine described by a few figures (a CLUSTER.toml), and the cost of each kind of work on it.

The figures are what the time model needs and nothing else, each per device (a GPU, or a CPU core running one rank)
while every device of the node is busy, since that is how training runs:

    [node]     devices (per node), memory_bytes (per device), runtime_bytes (per rank: interpreter, libraries)
    [compute]  gemm_call_s (fixed cost of one matmul call), call_s (of one elementwise NumPy/CuPy call),
               transcendental_rate (exp/tanh elements/s), scatter_rate (np.add.at elements/s),
               elementwise_bw = {array bytes = B/s} (bytes read + written by one pass, by the array's size: a pass
               over an array that stays in cache runs faster than one that streams from memory)
    [compute.gemm.<dtype>]  {min dimension = FLOP/s}: matmul throughput by shape class, the class being the smallest
               of (m, n, k) (a thin matmul runs below the machine's peak); interpolated in log(dimension). On a
               CPU (backend numpy) a bfloat16 table also says the nodes run bf16 products on oneDNN (reads_bf16)
    [compute]  optional tiny_block_s: seconds of the model's own Block forward and backward at a tiny shape
               (bench/calibrate.TINY_BLOCK), nearly all of it its Python and NumPy calls: the layers' calls are
               priced at what it implies per call (plan/layer_calls.py) instead of call_s and gemm_call_s
    [compute.gemm_wide.<dtype>]  optional: the same table from products whose other two dimensions are GEMM_WIDE
               (compute.gemm's are GEMM_OTHER): a product is priced between the two by the geometric mean of its
               other two dimensions, in log, clamped (larger products run below the 768-wide ones here: 9% at 2
               threads); missing, by compute.gemm alone
    [compute.gemm_batched.<dtype>]  optional: {multiply-adds per matrix = FLOP/s}: a stacked matmul's rate
               (attention's per-head products, one call per matrix on NumPy), by its matrices' size (small ones run
               far below the table above, and with the shared pool those below gemm.POOL_MIN_MACS on one thread);
               interpolated in log(size); missing, the products are priced by compute.gemm
    [compute.kernels]  optional: {kernel = {array elements = elements/s}} for the kernel layer's calls (KERNELS),
               each timed through the function the step calls, as HPC_LLM_KERNELS and HPC_LLM_POOL ran them in the
               calibrating process (bench/kernel_rates.py); a float32 step prices those calls by them (Pricer.kernel)
               instead of their NumPy passes; a kernel missing is priced by its passes
    [compute.cast]  optional: to_bfloat16, from_bfloat16, to_float16, from_float16: elements/s of a conversion
               between float32 and the 2-byte format (bf16/fp16 training: Precision.keep, use, operand, round_).
               On NumPy a conversion is compute-bound (ml_dtypes' bfloat16 cast runs ~10x slower per element than
               an add; NumPy's float16 cast slower still); missing, it is priced as a pass at elementwise_bw
               (4 + 2 bytes per element), what a GPU's bandwidth-bound cast kernel costs
    [link.intra], [link.inter]  latency_s, bw (B/s per device), optional nb_bw (a nonblocking collective's
               bandwidth; default bw) and overlap (the fraction of a nonblocking collective that can proceed while
               the device computes: 0 where the CPU itself moves the bytes, 1 with a DMA engine; default 1)
               optional bw_by_size, nb_bw_by_size = {message bytes = B/s}: the same by the collective's buffer
               size (integers), interpolated in log(size), clamped at the ends; they replace bw / nb_bw for every
               message (nb_bw_by_size missing: bw_by_size where nb_bw is missing too, else nb_bw)
               optional [link.<level>.collectives]: {kind = {message bytes = B/s}} for the other collectives a
               step issues, each by its own call (COLLECTIVES below; a kind without a table: bw_by_size or
               nb_bw_by_size, as before)
               optional backend = "numpy" (default) | "cupy": NumPy runs a stacked matmul as one BLAS call per matrix
               and GELU's passes by L2-sized chunks; CuPy makes one batched cuBLAS call and one pass per array
    [storage]  write_bw (B/s of one checkpoint writer, fsync included)
    [sources]  free text per figure: where each number comes from

Collective algorithms (docs/planning.md), S the bytes of the whole buffer, n ranks, latency a, bandwidth b:
    ring allreduce          2 (n-1)/n S/b + 2 (n-1) a
    tree allreduce          2 ceil(log2 n) (a + S/b)        (binomial reduce + broadcast: small messages)
    allreduce               the cheaper of the two (what MPI and NCCL choose by size)
    reduce-scatter, allgather (ring)   (n-1)/n S/b + (n-1) a
    point to point          a + S/b
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from hpc_llm.errors import UserError

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# the other two dimensions of compute.gemm's products and of compute.gemm_wide's (bench/calibrate.gemm_rates)
GEMM_OTHER, GEMM_WIDE = 768, 2048
# the kernel layer's calls a cluster file may give rates for ([compute.kernels]; bench/kernel_rates.KERNEL_CALLS
# times each): the elements each covers, as plan/compute.py counts them
KERNELS = (
    "layernorm_forward",  # LayerNorm's output, xhat and rstd from x (N, C): per element of x
    "layernorm_backward_input",  # LayerNorm's B: the input gradient
    "layernorm_backward_weight",  # LayerNorm's W: its weight and bias gradients
    "bias_add",  # a linear layer's bias added to its output
    "residual_add",  # a branch added to the residual stream (no dropout)
    "column_sums",  # a bias gradient: the sum of an output gradient's rows
    "to_heads",  # (B, T, parts x C) into attention's head layout, q scaled: per element copied
    "from_heads",  # the head layout back, (dq's) scale
    "softmax_forward",  # a query block's causal softmax: per score
    "softmax_backward",  # its backward: per score
    "gelu_forward",  # GELU and its kept tanh: per element of its input
    "gelu_backward",  # GELU's input gradient
    "cross_entropy",  # the loss's max, exp, sums and normalisation: per logit
    "cross_entropy_backward",  # the logits' gradient: per logit
    "scatter_add",  # the embedding's gradient rows added into wte: per element
    "adamw",  # the optimizer step: per parameter owned
)


@dataclass(frozen=True)
class Link:
    latency_s: float
    bw: float
    nb_bw: float
    overlap: float = 1.0
    # optional ((message bytes, B/s), ...) sorted: the bandwidth by the collective's buffer size, which a slow link
    # reaches a different share of at each size (TCP's window against the shaper's queue); empty: bw at every size
    bw_by_size: tuple = ()
    nb_bw_by_size: tuple = ()
    # optional ((kind, ((message bytes, B/s), ...)), ...): the other collectives' own tables (COLLECTIVES)
    collectives: tuple = ()

    def bw_at(self, nbytes: float) -> float:
        """The blocking bandwidth for a message of nbytes: interpolated in log(size), clamped at the ends."""
        return _interp_log(self.bw_by_size, nbytes) if self.bw_by_size else self.bw

    def nb_bw_at(self, nbytes: float) -> float:
        """The nonblocking bandwidth for a message of nbytes, as bw_at."""
        return _interp_log(self.nb_bw_by_size, nbytes) if self.nb_bw_by_size else self.nb_bw

    def seconds(self, kind: str, nbytes: float, n: int, nonblocking: bool | None = None) -> float:
        """One collective of `kind` (COLLECTIVES) on a buffer of nbytes among n ranks: its algorithm's formula at
        its own table's bandwidth for that size. A kind without a table is priced as before the tables by kind:
        at nb_bw_at (nonblocking; by default the kinds whose call is MPI's nonblocking one) or bw_at. A 16-bit
        reduction (PHASES) is its phases' sum where both have tables, else its formula as one collective."""
        tables = dict(self.collectives)
        phases = PHASES.get(kind, ())
        if phases and all(p in tables for p in phases):
            return sum(self.seconds(p, nbytes, n) for p in phases)
        formula, own_nb = COLLECTIVES[kind]
        if kind in tables:
            b = _interp_log(tables[kind], nbytes)
        elif own_nb if nonblocking is None else nonblocking:
            b = self.nb_bw_at(nbytes)
        else:
            b = self.bw_at(nbytes)
        return formula(nbytes, n, self.latency_s, b)

    def slowed(self, share: float) -> Link:
        """The link when `share` ranks share it: every latency `share` times, every bandwidth 1/share."""

        def scaled(table: tuple) -> tuple:
            return tuple((size, b / share) for size, b in table)

        return Link(
            self.latency_s * share,
            self.bw / share,
            self.nb_bw / share,
            self.overlap,
            scaled(self.bw_by_size),
            scaled(self.nb_bw_by_size),
            tuple((kind, scaled(t)) for kind, t in self.collectives),
        )


@dataclass
class Cluster:
    name: str
    devices: int
    memory_bytes: float
    runtime_bytes: float
    gemm: dict  # dtype -> sorted [(min dimension, FLOP/s)]
    gemm_call_s: float
    call_s: float
    transcendental_rate: float
    scatter_rate: float
    elementwise_bw: list  # sorted [(array bytes, B/s)]
    links: dict  # "intra" | "inter" -> Link (inter may be missing: a one-node machine)
    write_bw: float
    backend: str = "numpy"
    path: str = ""
    cast: dict = field(default_factory=dict)  # "to_bfloat16" | "from_bfloat16" | ... -> elements/s
    # seconds of the model's Block forward + backward at bench/calibrate.TINY_BLOCK (plan/layer_calls.py); None: the
    # layers' calls at call_s and gemm_call_s
    tiny_block_s: float | None = None
    # kernel (KERNELS) -> sorted [(array elements, elements/s)]: the kernel layer's calls as the calibrating process
    # ran them; a float32 step's elementwise calls priced by them (Pricer.kernel)
    kernels: dict = field(default_factory=dict)
    # dtype -> sorted [(multiply-adds per matrix, FLOP/s)]: stacked matmuls (batch > 1) as the calibrating rank ran
    # them; missing: priced by gemm
    gemm_batched: dict = field(default_factory=dict)
    # dtype -> sorted [(min dimension, FLOP/s)] of products whose other dimensions are GEMM_WIDE (gemm's: GEMM_OTHER)
    gemm_wide: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    # -- compute -------------------------------------------------------------------------------------------------

    @property
    def reads_bf16(self) -> bool:
        """Whether the nodes run bf16 products on oneDNN's bf16 GEMM (kernels/gemm.reads_bf16): a CPU cluster with a
        compute.gemm.bfloat16 figure, which `bench calibrate` writes only where that GEMM loads."""
        return self.backend == "numpy" and "bfloat16" in self.gemm

    def gemm_rate(self, dtype: str, m: int, n: int, k: int) -> float:
        if dtype not in self.gemm:
            raise UserError(
                f"cluster {self.path or self.name}: missing figure compute.gemm.{dtype} (matmul FLOP/s "
                f"by shape class for {dtype})"
            )
        rate = _interp_log(self.gemm[dtype], min(m, n, k))
        if dtype not in self.gemm_wide:
            return rate
        # between the two tables by the other two dimensions' geometric mean, in log, clamped at their widths
        other = math.sqrt(m * n * k / min(m, n, k))
        w = (math.log(other) - math.log(GEMM_OTHER)) / (math.log(GEMM_WIDE) - math.log(GEMM_OTHER))
        wide = _interp_log(self.gemm_wide[dtype], min(m, n, k))
        return rate + min(1.0, max(0.0, w)) * (wide - rate)

    def gemm_time(self, dtype: str, m: int, n: int, k: int, batch: int = 1) -> float:
        """`batch` matmuls (m x k) @ (k x n): NumPy runs a stacked matmul as one BLAS call per matrix, CuPy as one
        batched call."""
        if m * n * k == 0:
            return 0.0
        calls = 1 if self.backend == "cupy" else batch
        if batch > 1 and dtype in self.gemm_batched:
            rate = _interp_log(self.gemm_batched[dtype], m * n * k)
        else:
            rate = self.gemm_rate(dtype, m, n, k)
        return calls * self.gemm_call_s + batch * 2.0 * m * n * k / rate

    def pass_time(
        self, accesses: float, itemsize: int, array_elems: float, calls: float = 1.0
    ) -> float:
        """Elementwise work: `accesses` element reads + writes over arrays of about `array_elems` elements each."""
        bw = _interp_log(self.elementwise_bw, max(1.0, array_elems * itemsize))
        return accesses * itemsize / bw + calls * self.call_s

    def kernel_time(self, name: str, elems: float, calls: float = 1.0) -> float:
        """`calls` calls of kernel `name` (KERNELS, a figure of this file) over `elems` elements in all: at its
        rate for a call's array size (interpolated in log, clamped at the ends), plus call_s a call."""
        size = max(1.0, elems / max(calls, 1.0))
        return elems / _interp_log(self.kernels[name], size) + calls * self.call_s

    def cast_time(self, fmt: str, to_low: bool, elems: float, calls: float = 1.0) -> float:
        """`calls` conversions of `elems` elements in all between float32 and the 2-byte format `fmt`
        ("bfloat16" | "float16"): to it (to_low) or back."""
        rate = self.cast.get(("to_" if to_low else "from_") + fmt)
        if rate is None:  # a bandwidth-bound pass: 4 bytes read + 2 written, or 2 + 4
            return self.pass_time(1.5 * elems, 4, elems, calls)
        return elems / rate + calls * self.call_s

    # -- communication -------------------------------------------------------------------------------------------

    def link(self, level: str) -> Link:
        if level not in self.links:
            why = (
                f"this layout has groups spanning nodes of {self.devices} devices"
                if level == "inter"
                else "this layout has groups of several ranks (calibrate under `mpiexec -n 2` to measure it)"
            )
            raise UserError(
                f"cluster {self.path or self.name}: missing figures link.{level}.latency_s and "
                f"link.{level}.bw (needed: {why})"
            )
        return self.links[level]


def _interp_log(table: list, x: float) -> float:
    """Piecewise-linear in log(x) through sorted (x, y) points, constant beyond the ends."""
    xs = [p[0] for p in table]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return table[0][1]
    if i == len(table):
        return table[-1][1]
    (x0, y0), (x1, y1) = table[i - 1], table[i]
    w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + w * (y1 - y0)


# -- collective costs (seconds), S = bytes of the whole buffer ------------------------------------------------------


def ring_allreduce(S: float, n: int, a: float, b: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * S / b + 2 * (n - 1) * a


def tree_allreduce(S: float, n: int, a: float, b: float) -> float:
    return 0.0 if n <= 1 else 2 * math.ceil(math.log2(n)) * (a + S / b)


def allreduce(S: float, n: int, a: float, b: float) -> float:
    return min(ring_allreduce(S, n, a, b), tree_allreduce(S, n, a, b))


def reduce_scatter(S: float, n: int, a: float, b: float) -> float:
    return 0.0 if n <= 1 else (n - 1) / n * S / b + (n - 1) * a


allgather = reduce_scatter  # the same ring, run the other way


def p2p(S: float, a: float, b: float) -> float:
    return a + S / b


# Each collective a step issues, by the parallel/comm.py call that makes it -> (its cost formula, whether MPI's call
# is nonblocking). "allreduce" and "iallreduce" are priced by bw_by_size and nb_bw_by_size; the others by their own
# table in [link.<level>.collectives] where it has one.
COLLECTIVES = {
    # Comm.allreduce_: TP's f/g, the cross-entropy's sums, buckets final only at backward's end, the tied embedding
    "allreduce": (allreduce, False),
    # Comm.iallreduce_: data-parallel buckets in flight, PowerSGD's factors
    "iallreduce": (allreduce, True),
    # Comm.ireduce_scatter_: ZeRO's buckets and units; Comm.allgather_: ZeRO-1/2's parameters after the step
    "ireduce_scatter": (reduce_scatter, True),
    "allgather": (allgather, False),
    # Comm.iallgatherv_: ZeRO-3's units, the 16-bit reductions' gathers
    "iallgatherv": (allgather, True),
    # sequence parallelism in fp32
    "reduce_scatter_along": (reduce_scatter, False),
    "allgather_along": (allgather, False),
    # Comm.ialltoallv_: the 16-bit reduce-scatter (a reduce-scatter's bytes)
    "ialltoallv": (reduce_scatter, True),
    # Comm.isend / irecv: pipeline messages
    "p2p": (lambda S, n, a, b: p2p(S, a, b), False),
    # the 16-bit allreduce (wire16.allreduce_, compression.Reduce16 without ZeRO-1): PHASES' two collectives
    "allreduce16": (allreduce, True),
}
PHASES = {"allreduce16": ("ialltoallv", "iallgatherv")}
# the kinds a [link.<level>.collectives] table may hold
MEASURED = tuple(k for k in COLLECTIVES if k not in ("allreduce", "iallreduce", *PHASES))
