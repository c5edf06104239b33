"""The CuPy backend against the NumPy one (float64): same loss, same gradients, same KV-cache logits.

Marked `gpu`: skipped, with the reason, where CuPy or a GPU is missing (the only tests CI may skip: tests/conftest.py);
with HPC_LLM_REQUIRE_GPU=1 (set it on a GPU machine) a missing CuPy or GPU is an error instead. The CPU suite's
finite-difference checks cover the NumPy path these tests compare against.
"""

import numpy as np
import pytest
from helpers import probe_gpu

from hpc_llm.config import ModelConfig
from hpc_llm.model.gpt import GPT
from hpc_llm.model.kv_cache import KVCache

cupy, NO_GPU = probe_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))]


def models(seed):
    cfg = ModelConfig(
        n_layer=2, n_head=3, n_embd=24, block_size=300, vocab_size=77, dtype="float64"
    )
    return GPT(cfg, np, seed=seed), GPT(cfg, cupy, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_match_numpy(seed):
    cpu, gpu = models(seed)
    rng = np.random.default_rng(seed)
    # several attention query blocks
    x, y = (rng.integers(0, 77, (2, 300)), rng.integers(0, 77, (2, 300)))
    loss_cpu = cpu.forward(x, y, keep_cache=True)
    loss_gpu = gpu.forward(cupy.asarray(x), cupy.asarray(y), keep_cache=True)
    assert abs(loss_cpu - loss_gpu) < 1e-12 * abs(loss_cpu)
    cpu.backward()
    gpu.backward()
    np.testing.assert_allclose(cupy.asnumpy(gpu.grad_flat), cpu.grad_flat, rtol=1e-10, atol=1e-13)


def test_kv_cache_matches_full_forward():
    _, gpu = models(3)
    idx = cupy.asarray(np.random.default_rng(3).integers(0, 77, (2, 40)))
    full = gpu.logits(idx)
    cache = KVCache(gpu, 2)
    parts = [gpu.forward_cached(idx[:, :17], cache)] + [
        gpu.forward_cached(idx[:, t : t + 1], cache) for t in range(17, 40)
    ]
    np.testing.assert_allclose(
        cupy.asnumpy(cupy.concatenate(parts, axis=1)), cupy.asnumpy(full), rtol=1e-10, atol=1e-12
    )
