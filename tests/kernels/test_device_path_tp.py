"""The device path's sequence-parallel gathers on a real TP group (the launch-counting stand-in for CuPy, values
computed): a kept 16-bit input slice travels as its bits, whatever parallel.act_comm, and the block and the tied head
(16-bit GEMMs on a device) give bitwise what the CPU path's give (which gathers the widened float32 values, or 16-bit
wire words). The fused attention is off: its online softmax and Philox masks differ from the CPU loop's by design
(tests/kernels/test_attention.py)."""

import numpy as np
import pytest
from helpers import check
from mpi4py import MPI

from hpc_llm.config import ModelConfig
from hpc_llm.kernels.cuda.launches import xp
from hpc_llm.model import attention as SA
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layers import DropoutRNG, WeightWork
from hpc_llm.parallel.grid import make_grid


@pytest.mark.timeout(60)
@pytest.mark.parallel(nprocs=2)
def test_device_sequence_parallel_block_equals_the_cpu_block_bitwise(monkeypatch):
    monkeypatch.setenv("HPC_LLM_KERNELS", "numpy")  # the CPU path's twins (numba's tanh differs)
    monkeypatch.setattr(SA, "FUSED_ATTENTION", False)
    grid = make_grid(MPI.COMM_WORLD, 2)
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.1)
    pos = slice(8 * grid.tp_rank, 8 * grid.tp_rank + 8)
    data = np.random.default_rng(5).standard_normal((2, 2, 16, 32)).astype(np.float32)
    targets = np.random.default_rng(6).integers(0, 64, (2, 16))
    bad = []
    for act in ("fp32", "bf16"):
        got = {}
        for mod in (np, xp):
            tp = grid.tp_comm
            kw = dict(
                tp_comm=tp, tp_act=tp.with_wire(act), precision="bf16", sequence_parallel=True
            )
            model = GPT(cfg, mod, seed=3, **kw)
            block = model.chunks[0].blocks[0]
            x, dy = (mod.asarray(np.ascontiguousarray(a[:, pos])) for a in data)
            y, cache = block.forward(x, DropoutRNG(0, 0, 0, range(2), mod))
            work = WeightWork(False)
            dx = block.backward_input(dy, cache, work, DropoutRNG(0, 0, 0, range(2), mod))
            work.run(False)
            # the tied head on the block's output slice: on the device its GEMMs read the gathered kept bits
            loss, hcache = model.chunks[0].head.forward(y, mod.asarray(targets))
            dh = model.chunks[0].head.backward(hcache, 1.0, False)
            got[mod] = [np.asarray(a).copy() for a in (y, dx, loss, dh, model.grad_flat)]
        names = ("output", "input gradient", "loss", "head's input gradient", "gradients")
        for what, a, b in zip(names, got[np], got[xp]):
            if not np.array_equal(a, b):
                bad.append(f"act_comm {act}: {what} differ by {np.abs(a - b).max()}")
    check(not bad, "\n".join(bad))


@pytest.mark.timeout(60)
@pytest.mark.parallel(nprocs=2)
def test_device_stage_transfers_cast_on_the_device_as_the_host_path():
    """A pp2 pipeline's messages on the 16-bit wire (parallel.act_comm) with device arrays (the stand-in): the
    sender's cast is one kernel (wire_narrow) and the receiver's widening one (wire_widen), and the activation
    forward and the gradient back arrive bitwise as the host path's (bf16; fp16 with its scale, on values of wide
    magnitudes)."""
    from hpc_llm.kernels.cuda.launches import counting
    from hpc_llm.parallel.comm import Comm
    from hpc_llm.parallel.pipeline_comm import PipelineComm

    plain = Comm(MPI.COMM_WORLD, name="pp")
    r = plain.rank
    rng = np.random.default_rng(7)
    shape = (2, 8, 12)
    act = (rng.standard_normal(shape) * np.exp(rng.uniform(-12, 3, shape))).astype(np.float32)
    grad = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
    bad = []
    for fmt in ("bf16", "fp16"):
        got = {}
        for mod in (np, xp):
            pipe = PipelineComm(plain.with_wire(fmt), n_virtual=2)
            buf = mod.zeros(shape, dtype=np.float32)
            with counting() as ledger:
                if r == 0:
                    pipe.send_forward(mod.asarray(act), 0, 0)
                    pipe.recv_backward(buf, 0, 0).wait()
                else:
                    pipe.recv_forward(buf, 0, 1).wait()
                    pipe.send_backward(mod.asarray(grad), 0, 1)
                pipe.wait_sends()
            got[mod] = np.asarray(buf).copy()
            if mod is xp and (ledger.launches["wire_narrow"], ledger.launches["wire_widen"]) != (
                1,
                1,
            ):
                bad.append(f"rank {r} {fmt}: casts {dict(ledger.launches)}")
        if not np.array_equal(got[np].view(np.uint32), got[xp].view(np.uint32)):
            bad.append(f"rank {r} {fmt}: the device message differs from the host path's")
        if np.array_equal(got[np], act if r else grad):
            bad.append(f"rank {r} {fmt}: nothing was rounded (the test would not see a cast)")
    check(not bad, "\n".join(bad))
