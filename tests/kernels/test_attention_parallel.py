"""The fused attention under tensor and sequence parallelism (mpi-pytest, 2 ranks): a Block on the device path
(the launch-counting stand-in for CuPy, whose fused kernels run their NumPy twins), float64, dropout 0.2, equals the
same Block in one process on the device path: output, input gradient and every parameter gradient (F64_RTOL: the
sharded matmuls sum in another order). The attention masks are the hash's (FlashCache), a pure function of the global
row, head and positions, so each TP rank's heads draw the single process's."""

import numpy as np
import pytest
from helpers import F64_RTOL, check, mismatch
from mpi4py import MPI

from hpc_llm.config import ModelConfig
from hpc_llm.kernels.cuda import fused_attention
from hpc_llm.kernels.cuda.launches import xp
from hpc_llm.model import layers as L
from hpc_llm.model.gpt import GPT
from hpc_llm.parallel.grid import make_grid


@pytest.mark.timeout(120)
@pytest.mark.parallel(nprocs=2)
def test_fused_attention_block_tp_and_sp_equal_one_process():
    bad = []
    cfg = ModelConfig(
        n_layer=1, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.2, dtype="float64"
    )
    B, T, C = 2, 16, 32
    rng = np.random.default_rng(5)
    x, dout = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
    ref_model = GPT(cfg, xp, seed=7)
    ref = ref_model.chunks[0].blocks[0]
    drop = L.DropoutRNG(3, 1, 0, range(4, 4 + B), xp)
    y_ref, c_ref = ref.forward(xp.asarray(x.copy()), drop)  # x and dout: updated in place
    dx_ref = ref.backward(xp.asarray(dout.copy()), c_ref, accumulate=False)
    tp = 2
    grid = make_grid(MPI.COMM_WORLD, tp)
    for sp in (False, True):
        model = GPT(cfg, xp, seed=7, tp_comm=grid.tp_comm, sequence_parallel=sp)
        blk = model.chunks[0].blocks[0]
        n = T // tp if sp else T
        pos = slice(grid.tp_rank * n, (grid.tp_rank + 1) * n) if sp else slice(None)
        y, c = blk.forward(xp.asarray(x[:, pos].copy()), drop)
        dx = blk.backward(xp.asarray(dout[:, pos].copy()), c, accumulate=False)
        w = f"tp {tp} sp {sp}"
        if not isinstance(c.attn[2], fused_attention.FlashCache):
            bad.append(f"{w}: attention took the unfused path")
        bad += mismatch(np.asarray(y), np.asarray(y_ref)[:, pos], f"{w} output", rtol=F64_RTOL)
        bad += mismatch(np.asarray(dx), np.asarray(dx_ref)[:, pos], f"{w} dx", rtol=F64_RTOL)
        grads = model.full_tensors(model.grad_flat)
        for name in (k for k in grads if k.startswith("h.0.")):
            want = np.asarray(ref_model.grads[name])
            bad += mismatch(np.asarray(grads[name]), want, f"{w} {name}", rtol=F64_RTOL)
    check(not bad, "\n".join(bad))
