"""Small measurements shared by the trainer's log (the MFU denominator) and the benchmark scripts, and the machine
figures `hpc-llm bench calibrate` writes for the planner."""

from __future__ import annotations

import importlib
import os
import platform
import socket
import tempfile
import time

import numpy as np

from hpc_llm.backend import low_dtype
from hpc_llm.bench.kernel_rates import gemm_batched_rates, kernel_rates
from hpc_llm.bench.timer import best_time, median_time
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.kernels import gemm
from hpc_llm.kernels.blas import blas_lines, openblas_kernel
from hpc_llm.kernels.dispatch import kernels_choice, numba_available
from hpc_llm.kernels.pool import pool_threads
from hpc_llm.kernels.rounding import from_low, to_low
from hpc_llm.model.gpt import GPT
from hpc_llm.model.precision import Precision
from hpc_llm.parallel.comm import Comm, world_comm
from hpc_llm.parallel.data_parallel import split_counts
from hpc_llm.plan.cluster import GEMM_OTHER, GEMM_WIDE

# What a training rank has loaded besides hpc_llm's own small modules: imported before the baseline memory figure
# is read, so that it is a rank's resident size before its first tensor
TRAINING_LIBRARIES = ("numpy", "h5py", "mpi4py.MPI", "tokenizers")


def synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_device().synchronize()


def matmul_peak_flops(xp=np, dtype=np.float32, n: int = 2048, repeats: int = 3) -> float:
    """The best of `repeats` timings of one n^3 matmul, in FLOP/s: the machine's practical peak for this dtype."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    b = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    out = xp.empty((n, n), dtype=dtype)

    def matmul():
        xp.matmul(a, b, out=out)
        synchronize(xp)

    return 2.0 * n**3 / best_time(matmul, repeats)


# -- `hpc-llm bench calibrate`: this machine's figures for the planner (hpc_llm/plan/cluster.py) -------------------


GEMM_CLASSES = (16, 32, 64, 128, 256, 512, 1024)


def gemm_rates(dtype, other: int = GEMM_OTHER, repeats: int = 9, product=None) -> dict:
    """{min dimension: FLOP/s}: for each class d, the mean rate of the three products a linear layer makes, in the
    layouts it makes them: forward (other x d) @ (d x other), its weight gradient (other x d)^T @ (other x other)
    and its input gradient (other x other) @ (d x other)^T: the thin dimension as k, m and n, the transposed operands
    as views (BLAS reads them transposed: 5-10% slower than the plain layout here). product(a, b, out): the call
    timed (default the step's own, kernels/gemm.matmul: NumPy's BLAS, or oneDNN's sgemm with the shared pool on);
    out float32 for a 2-byte dtype."""
    product = product or (lambda a, b, o: gemm.matmul(a, b, o))
    wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rng = np.random.default_rng(0)
    out = {}
    # twice round, the better of the two: a burst of load hits one class, not all
    for d in GEMM_CLASSES * 2:
        rates = []
        for m, k, n, ta, tb in (
            (other, d, other, False, False),
            (d, other, other, True, False),
            (other, other, d, False, True),
        ):
            a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
            b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
            a, b = (a.T if ta else a), (b.T if tb else b)
            o = np.empty((m, n), wide)
            rates.append(2.0 * m * n * k / best_time(lambda: product(a, b, o), repeats))
        out[str(d)] = max(out.get(str(d), 0.0), float(np.mean(rates)))
    return out


def bf16_gemm_rates(other: int = 768, repeats: int = 5) -> dict | None:
    """gemm_rates of oneDNN's bf16 GEMM (kernels/gemm.bf16_matmul: bfloat16 operands as the products hold them,
    float32 out), where bf16 training runs its products on it (gemm.reads_bf16), else None: the planner reads the
    figure's presence as that (plan/cluster.Cluster.reads_bf16)."""
    if not gemm.reads_bf16(Precision("bf16")):
        return None
    return gemm_rates(low_dtype("bf16"), other, repeats, gemm.bf16_matmul)


ROW = 256  # elements per row of the pass mix: a layer's rows are n_embd (or a score row) long
PASS_MIX_ACCESSES = 10  # element reads + writes of _pass_mix per element of x


def _pass_mix(x, w) -> None:
    """The passes this code's layers are made of (LayerNorm's, softmax's): a reduction along the last axis, a
    broadcast subtract, a multiply by a row vector, an in-place add. 10 accesses per element; they run 3-4x slower
    per byte than a plain `a += b`, which would overstate the bandwidth the model sees."""
    m = x.mean(axis=-1, keepdims=True)  # 1
    y = x - m  # 2
    y *= w  # 2... as y = y * w in place: read y, w (cached), write y
    y += x  # 3
    x -= y  # ...and back, so x stays bounded: 2 more (read y, read/write x counted as 2)


def cast_rates(n: int = 1 << 20) -> dict:
    """Conversions float32 <-> bfloat16 and float16 as model/precision.py makes them (kernels/rounding.py: compiled
    for bfloat16 where HPC_LLM_KERNELS allows, else NumPy's astype), in elements/s: {"to_bfloat16", "from_bfloat16",
    "to_float16", "from_float16"}. NumPy's are scalar loops, not bandwidth-bound passes (0.7 ns per element to
    bfloat16 here, ~10x an add; the compiled bfloat16 ones ~8x faster), which bf16/fp16 training pays; best of
    9 on 2^20 elements (the layers' operand sizes; the rate hardly changes from 2^16 to 2^22), twice round. Empty
    without ml_dtypes (the planner then prices a cast as an elementwise pass)."""
    try:
        import ml_dtypes
    except ImportError:
        return {}
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    rates = {}
    for name, low in (
        ("bfloat16", np.dtype(ml_dtypes.bfloat16)),
        ("float16", np.dtype(np.float16)),
    ):
        y = to_low(x, low)
        to = min(best_time(lambda: to_low(x, low)) for _ in range(2))
        back = min(best_time(lambda: from_low(y, np.float32)) for _ in range(2))
        rates[f"to_{name}"], rates[f"from_{name}"] = n / to, n / back
    return rates


def elementwise_figures() -> dict:
    """Per-call costs (one call in a hot loop, and a tiny Block's whole forward and backward), exp and scatter rates,
    and elementwise bandwidth (bytes read + written per second of the pass mix above) by array size."""
    small = np.ones(16, np.float32)
    a4, b4 = np.ones((4, 4), np.float32), np.ones((4, 4), np.float32)
    calls = 2000
    call_s = best_time(lambda: [small.__imul__(1.0) for _ in range(calls)], 5) / calls
    gemm_call_s = best_time(lambda: [a4 @ b4 for _ in range(calls)], 5) / calls
    x, y = np.zeros(1 << 16, np.float32), np.empty(1 << 16, np.float32)
    trans = x.size / best_time(lambda: np.exp(x, out=y), 21)
    rows = np.random.default_rng(0).integers(0, 1000, 4096)
    table, d = np.zeros((1000, 128), np.float32), np.ones((4096, 128), np.float32)
    scatter = d.size / best_time(lambda: np.add.at(table, rows, d), 5)
    bw = {}
    for nbytes in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26):
        x = np.ones((nbytes // 4 // ROW, ROW), np.float32)
        w = np.ones(ROW, np.float32)
        bw[str(nbytes)] = (
            PASS_MIX_ACCESSES
            * nbytes
            / best_time(lambda: _pass_mix(x, w), 9 if nbytes < 1 << 24 else 5)
        )
    return {
        "call_s": call_s,
        "gemm_call_s": gemm_call_s,
        "transcendental_rate": trans,
        "scatter_rate": scatter,
        "elementwise_bw": bw,
        "tiny_block_s": tiny_block_s(),
    }


# the Block tiny_block_s times: its compute a few microseconds of its ~200, the rest its Python and NumPy calls
TINY_BLOCK = {"batch": 1, "block_size": 8, "n_embd": 16, "n_head": 2}


def tiny_block_s(calls: int = 200) -> float:
    """Seconds of one forward and backward of the model's own Block (fp32, no dropout) at TINY_BLOCK: what a
    layer's Python and its NumPy calls cost as a step makes them (~1.5 us a call here, against call_s's 0.5 from
    one call repeated in a hot loop). The median of 5 trains of `calls`, the better of two rounds; the two copies
    that restore the input and the output gradient (2 of its ~120 calls) included."""
    t = TINY_BLOCK
    shape = {k: t[k] for k in ("n_head", "n_embd", "block_size")}
    cfg = ModelConfig(n_layer=1, vocab_size=64, **shape)
    block = GPT(cfg, seed=0).chunks[0].blocks[0]
    x0 = np.random.default_rng(0).standard_normal((t["batch"], t["block_size"], t["n_embd"]))
    x0 = x0.astype(np.float32)
    dy0 = np.ones_like(x0)

    def step():
        y, cache = block.forward(x0.copy())
        block.backward(dy0.copy(), cache, False)

    def train():
        for _ in range(calls):
            step()

    return min(median_time(train, 5, warmup=1) for _ in range(2)) / calls


def write_bandwidth(directory, nbytes: int = 64 << 20) -> float:
    """One file of nbytes written and fsynced, as a checkpoint write ends."""
    data = np.ones(nbytes // 8)
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        t0 = time.perf_counter()
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - t0)


# message bytes -> timed repeats of each collective: each a train of calls back to back (TRAIN_BYTES of buffers at
# least) between two barriers, the median one call's share; the largest size is the `bw` / `nb_bw` of files without
# the tables
LINK_SIZES = {1 << 16: 5, 1 << 18: 5, 1 << 20: 5, 1 << 22: 5, 1 << 24: 3}
TRAIN_BYTES = 2 << 20


def collective_calls(comm, nbytes: int) -> dict:
    """{kind: a call of it on a buffer of nbytes}: each collective the planner prices (plan/cluster.py COLLECTIVES),
    made by the parallel/comm.py call a step makes, on nbytes as the planner counts them (the whole buffer; p2p:
    one message each way between ranks 0 and 1 at once, as a pipeline's combined steps send an activation forward
    while a gradient comes back: on one TCP connection a train of these moves each way at half the one-way rate
    of a shaped link, 6.5 against 12 MB/s at 100mbit, and the step's messages are such a train)."""
    n = comm.size
    buf = np.ones(nbytes // 4 // n * n, np.float32)
    counts = split_counts(buf.size, n)
    words, recv = np.zeros(nbytes // 2, np.uint16), np.empty(nbytes // 2, np.uint16)
    word_counts = split_counts(words.size, n)
    piece = buf[: buf.size // n].reshape(1, -1)  # allgather_along: the whole is nbytes
    buf_in = np.empty_like(buf)

    def message():
        if comm.rank < 2:
            peer = 1 - comm.rank
            got = comm.irecv(buf_in, peer, 0, "p2p_recv")
            comm.isend(buf, peer, 0, "p2p_send").wait()
            got.wait()

    return {
        "allreduce": lambda: comm.allreduce_(buf),
        "iallreduce": lambda: comm.iallreduce_(buf).wait(),
        "ireduce_scatter": lambda: comm.ireduce_scatter_(buf, counts).wait(),
        "allgather": lambda: comm.allgather_(buf, counts),
        "iallgatherv": lambda: comm.iallgatherv_(buf, counts).wait(),
        "reduce_scatter_along": lambda: comm.reduce_scatter_along(buf.reshape(n, -1), 0),
        "allgather_along": lambda: comm.allgather_along(piece, 0),
        "ialltoallv": lambda: comm.ialltoallv_(words, word_counts, recv, word_counts).wait(),
        "p2p": message,
    }


def _median_seconds(comm, fn, repeats: int, calls: int) -> float:
    """One call's seconds: the median over `repeats` trains of `calls` calls of fn back to back, each train started
    after a barrier and ended by one (after one untimed call). A step's collectives come in trains (tp's 2 per
    layer and pass, ZeRO-3's gathers, the pipeline's messages), each starting behind the bytes its predecessor left
    on the link: a lone small one measured on an idle link, as its own sender's buffers and the shaper's burst
    carry it, would be priced up to twice too fast; the closing barrier waits for the last call's bytes. A shaped
    link's rate for one size also varies from call to call, so the median, not the best."""
    fn()
    times = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        comm.barrier()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def _bandwidth(kind: str, nbytes: int, n: int, latency: float, t: float) -> float:
    """The bandwidth at which the planner's cost formula of the kind (plan/cluster.py COLLECTIVES: the ring's)
    gives t seconds for nbytes among n ranks: an allreduce moves 2 (n-1)/n of the buffer in 2 (n-1) steps, a
    reduce-scatter, an allgather or an alltoallv (n-1)/n in n-1, a message all of it in one."""
    if kind == "p2p":
        share, steps = 1.0, 1
    else:
        steps = (2 if kind in ("allreduce", "iallreduce") else 1) * (n - 1)
        share = steps / n
    return share * nbytes / max(t - steps * latency, 1e-9)


def link_figures(comm, sizes: dict | None = None, train_bytes: int = TRAIN_BYTES) -> dict:
    """Between the ranks of `comm`: ping-pong latency (half a round trip of 8 bytes, ranks 0 and 1); each collective
    kind's bandwidth by message size (`sizes`: {bytes: repeats}, default LINK_SIZES; each repeat a train of calls
    moving train_bytes at least: _median_seconds), from its cost formula: the blocking allreduce's as bw_by_size,
    the nonblocking one's as nb_bw_by_size, the others' in `collectives` (a slow link's rate depends on the size,
    TCP's window against the shaper's queue, and on the collective, the bytes its algorithm moves); bw and nb_bw the
    largest size's; and how much of a nonblocking allreduce of the largest size proceeds while the rank computes
    (testing it between matmuls, as the trainer does between blocks)."""
    sizes = sizes or LINK_SIZES
    n = comm.size
    small = np.zeros(1, np.float64)
    iters = 200

    def pingpong():
        for i in range(iters):
            if comm.rank == 0:
                comm.isend(small, 1, i, "calib").wait()
                comm.irecv(small, 1, i, "calib").wait()
            elif comm.rank == 1:
                comm.irecv(small, 0, i, "calib").wait()
                comm.isend(small, 0, i, "calib").wait()

    comm.barrier()
    # only ranks 0 and 1 ping-pong, and send the p2p messages: theirs are the group's
    latency = comm.bcast_object(best_time(pingpong, 5) / (2 * iters))
    tables: dict = {kind: {} for kind in collective_calls(comm, 64)}
    t_nb = 0.0
    for nbytes, repeats in sorted(sizes.items()):
        for kind, call in collective_calls(comm, nbytes).items():
            calls = max(1, train_bytes // nbytes)
            t = _median_seconds(comm, call, repeats, calls)
            tables[kind][str(nbytes)] = _bandwidth(kind, nbytes, n, latency, t)
            t_nb = t if kind == "iallreduce" else t_nb  # the largest size's, last
    tables["p2p"] = comm.bcast_object(tables["p2p"])
    buf = np.ones(max(sizes) // 4, np.float32)
    a = np.ones((256, 256), np.float32)

    def timed(fn):
        comm.barrier()
        return best_time(fn, 3)

    comp = timed(lambda: [a @ a for _ in range(40)])

    def overlapped():
        h = comm.iallreduce_(buf)
        for i in range(40):
            a @ a
            if i % 4 == 0:
                h.test()
        h.wait()

    both = timed(overlapped)
    overlap = min(1.0, max(0.0, (comp + t_nb - both) / t_nb))
    bw, nb_bw = tables.pop("allreduce"), tables.pop("iallreduce")
    return {
        "latency_s": latency,
        "bw": bw[str(max(sizes))],
        "nb_bw": nb_bw[str(max(sizes))],
        "overlap": overlap,
        "bw_by_size": bw,
        "nb_bw_by_size": nb_bw,
        "collectives": tables,
    }


def _median_figures(every: list[dict]) -> dict:
    """Each figure's median over the groups' link_figures, a table's size by size (tables of tables too)."""
    out = {}
    for k, v in every[0].items():
        if isinstance(v, dict):
            out[k] = _median_figures([f[k] for f in every])
        else:
            out[k] = float(np.median([f[k] for f in every]))
    return out


def node_links(comm) -> tuple[dict, int]:
    """The link figures, by level: on one node `intra` between all the ranks; across nodes (ranks on several
    hostnames, as many on each) `intra` among the ranks on rank 0's node (where it has two or more) and `inter`
    per device: every rank at once in a group of one rank per node (the K-th of each), so the node's ranks share its
    link as training's cross-node groups do; the median over the groups. And the ranks per node (0: one node)."""
    if comm.size < 2:
        return {}, 0
    hosts = comm.allgather_objects(socket.gethostname())
    nodes = sorted(set(hosts), key=hosts.index)
    if len(nodes) == 1:
        return {"intra": link_figures(comm)}, 0
    counts = {hosts.count(h) for h in nodes}
    if len(counts) != 1:
        raise UserError(
            f"bench calibrate: {len(nodes)} nodes with different numbers of ranks ({sorted(counts)}): "
            "give each node the same"
        )
    per_node = counts.pop()
    local = comm.mpi.Split(nodes.index(hosts[comm.rank]), comm.rank)
    across = comm.mpi.Split(local.Get_rank(), comm.rank)
    out = {}
    if per_node > 1:
        intra = link_figures(Comm(local, name="node")) if hosts[comm.rank] == nodes[0] else None
        out["intra"] = comm.bcast_object(intra)
    comm.barrier()
    every = comm.allgather_objects(link_figures(Comm(across, name="nodes")))
    out["inter"] = _median_figures(every)
    return out, per_node


def calibrate(out_dir=".") -> tuple[dict, str]:
    """This machine's cluster figures, measured on every rank at once (so each device's figures are those of a
    busy node); the medians over ranks. Links only under mpiexec with >= 2 ranks. -> (cluster dict, notes)."""
    for name in TRAINING_LIBRARIES:
        importlib.import_module(name)
    # and numba (about 64 MiB), which a CPU rank's compiled kernels import (kernels/dispatch.py)
    if kernels_choice() != "numpy":
        numba_available()
    comm = world_comm()
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    comm.barrier()
    fig = {
        "gemm": {"float32": gemm_rates(np.float32), "float64": gemm_rates(np.float64)},
        "gemm_wide": {"float32": gemm_rates(np.float32, GEMM_WIDE)},
        "gemm_batched": {"float32": gemm_batched_rates()},
        **elementwise_figures(),
        "cast": cast_rates(),
        "kernels": kernel_rates(),
    }
    bf16 = bf16_gemm_rates()
    if bf16 is not None:
        fig["gemm"]["bfloat16"] = bf16
    every = comm.allgather_objects(fig)
    compute = _median_figures(every)
    if not compute["cast"]:
        del compute["cast"]
    # a device: the cores one rank computes on, its shared pool's threads (one core without the pool)
    threads = pool_threads() or 1
    devices = max(1, (os.cpu_count() or 1) // threads)
    with open("/proc/meminfo") as f:
        mem_total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    write_bw = write_bandwidth(out_dir) if comm.rank == 0 else 0.0
    d = {
        "name": f"this machine ({platform.node()}, {devices} cores), measured by hpc-llm bench calibrate",
        "node": {"devices": devices, "memory_bytes": mem_total // devices, "runtime_bytes": rss},
        "compute": compute,
        "storage": {"write_bw": write_bw},
    }
    notes = (
        f"measured on {comm.size} rank(s) at once; one device = {threads} core(s) running one rank "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); the kernel layer as "
        f"HPC_LLM_KERNELS={kernels_choice()} runs it, the shared pool "
        + (f"on ({pool_threads()} threads)" if pool_threads() else "off")
    )
    links, per_node = node_links(comm)
    if per_node:
        d["node"]["devices"] = per_node
        notes += f"; {per_node} ranks per node: a device = a rank's share of its node"
    if links:
        d["link"] = links
    else:
        notes += "; no link figures: run under `mpiexec -n 2` to measure them"
    d["sources"] = {
        "all": notes,
        "runtime_bytes": "VmRSS of the calibrating rank after importing the libraries a training rank loads",
        # the GEMM rates hold for this kernel: a job under another OPENBLAS_CORETYPE runs at other rates
        "blas": blas_lines(openblas_kernel())[0],
    }
    return d, notes
