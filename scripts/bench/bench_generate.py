#!/usr/bin/env python3
"""Generation throughput of hpc_llm's KV-cache decoding on the GPT-2-small shape (12 x 768, 12 heads, vocab 50257,
block 1024, random weights, float32), against Hugging Face transformers + PyTorch on the same weights and cores.

    PYTHONPATH=. /tmp/hfvenv/bin/python scripts/bench/bench_generate.py --threads 1 --batch 1 8
    PYTHONPATH=. .venv/bin/python scripts/bench/bench_generate.py --threads 1 --int8          # ours: float32 vs int8
    mpiexec -n 2 .venv/bin/python scripts/bench/bench_generate.py --threads 1 --tp --batch 1    # TP2 vs TP1 latency

For each batch size B: prefill (prompt) tokens/s = B * prompt_len / the prompt's forward, and new tokens/s =
B * new_tokens / the decode loop's time (greedy; each step one token per row through the cache). Both
implementations do the same work: the head on each row's last position only (HF: logits_to_keep=1), greedy
argmax, use_cache. Medians of --repeats runs. Without torch/transformers the reference is skipped with a line
saying so. The BLAS thread count (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, torch.set_num_threads) is --threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
p.add_argument("--prompt-len", type=int, default=128)
p.add_argument("--new-tokens", type=int, default=32)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--layers", type=int, default=12)
p.add_argument(
    "--int8",
    action="store_true",
    help="ours only: float32 vs --quantize int8 (speed, memory, logits)",
)
p.add_argument(
    "--tp", action="store_true", help="ours only, under mpiexec -n P: TP-P vs one rank, per token"
)
p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
args = p.parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)  # before numpy / torch load their BLAS

import numpy as np  # noqa: E402

from hpc_llm.config import ModelConfig  # noqa: E402
from hpc_llm.infer.generate import sample_sharded  # noqa: E402
from hpc_llm.model.gpt import GPT  # noqa: E402
from hpc_llm.model.kv_cache import KVCache  # noqa: E402

CFG = dict(
    n_layer=args.layers, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dtype="float32"
)


def median(xs):
    return statistics.median(xs)


def ours_once(model, idx, new_tokens):
    """(prefill seconds, decode seconds, tokens (B, new)) of one greedy generation, our decode loop as
    generate_batch runs it (forward_cached with last=True, split=True, and the sharded sampler)."""
    B = idx.shape[0]
    cache = KVCache(model, B, reuse=True)  # as generate_batch: the buffer of the previous repeat
    t0 = time.perf_counter()
    logits = model.forward_cached(idx, cache, last=True, split=True)
    t1 = time.perf_counter()
    out = []
    for _ in range(new_tokens):
        nxt = sample_sharded(logits, model.v0, model.tp, None, 0.0)
        out.append(nxt)
        logits = model.forward_cached(nxt[:, None], cache, last=True, split=True)
    t2 = time.perf_counter()
    cache.release()
    return t1 - t0, t2 - t1, np.stack(out, axis=1)


def hf_model(model):
    import warnings

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    warnings.filterwarnings("ignore")  # past_key_values' deprecation notice, once per call
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    c = model.cfg
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            n_positions=c.block_size,
            vocab_size=c.vocab_size,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )
    full = model.full_tensors(model.flat)
    state = {
        "transformer." + k: torch.from_numpy(
            np.ascontiguousarray(v[: c.vocab_size] if k == "wte.weight" else v)
        )
        for k, v in full.items()
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(
        k == "lm_head.weight" or k.endswith(".attn.bias") or "masked_bias" in k for k in missing
    ), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def hf_once(hf, idx, new_tokens):
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(idx)
        t0 = time.perf_counter()
        out = hf(x, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past, toks = out.past_key_values, []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            toks.append(nxt)
            out = hf(nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, 1).numpy()


def report(name, B, runs):
    pre = median([r[0] for r in runs])
    dec = median([r[1] for r in runs])
    print(
        f"{name:>12} B={B}: prefill {B * args.prompt_len / pre:8.1f} tok/s ({pre * 1e3:7.1f} ms), "
        f"decode {B * args.new_tokens / dec:7.1f} new tok/s ({dec / args.new_tokens * 1e3:6.1f} ms/step)",
        flush=True,
    )
    return pre, dec


def main():
    rng = np.random.default_rng(0)
    if (
        args.tp
        and int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0"))) != 0
    ):
        return tp_main(rng)
    print(
        f"GPT-2 small shape {CFG}, float32, {args.threads} BLAS thread(s), prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, medians of {args.repeats}",
        flush=True,
    )
    if args.tp:
        return tp_main(rng)
    model = GPT(ModelConfig(**CFG), seed=0)
    if args.int8:
        return int8_main(model, rng)
    hf = None
    if not args.no_hf:
        try:
            hf = hf_model(model)
            import torch
            import transformers

            print(
                f"reference: transformers {transformers.__version__}, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads)",
                flush=True,
            )
        except ImportError as e:
            print(
                f"SKIPPED the Hugging Face reference: {e} (needs torch and transformers)",
                flush=True,
            )
    for B in args.batch:
        idx = rng.integers(0, CFG["vocab_size"], size=(B, args.prompt_len))
        ours_once(model, idx, 2)  # warm-up: first-touch of the buffers, for both
        if hf is not None:
            hf_once(hf, idx, 2)
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternating, so both see the same load on a shared machine
            ours.append(ours_once(model, idx, args.new_tokens))
            if hf is not None:
                theirs.append(hf_once(hf, idx, args.new_tokens))
        a = report("hpc_llm", B, ours)
        if hf is not None:
            b = report("HF+torch", B, theirs)
            same = np.mean(ours[0][2] == theirs[0][2])
            print(
                f"{'':>12} ours/HF: prefill speed x{b[0] / a[0]:.2f}, decode speed x{b[1] / a[1]:.2f}; "
                f"greedy tokens equal: {same:.0%}",
                flush=True,
            )


def int8_main(model, rng):
    from hpc_llm.infer.quantize import quantize_model, weight_bytes

    ref = GPT(model.cfg, seed=None)
    ref.flat[...] = model.flat
    before = weight_bytes(model)
    quantize_model(model)
    after = weight_bytes(model)
    print(
        f"weights held: float32 {before / 2**20:.1f} MiB, int8 {after / 2**20:.1f} MiB ({after / before:.3f})"
    )
    idx = rng.integers(0, CFG["vocab_size"], size=(2, 64))
    d = np.abs(model.logits(idx) - ref.logits(idx))
    print(f"max |logits int8 - float32| = {d.max():.4f} (logits std {ref.logits(idx).std():.4f})")
    for B in args.batch:
        idx = rng.integers(0, CFG["vocab_size"], size=(B, args.prompt_len))
        report("float32", B, [ours_once(ref, idx, args.new_tokens) for _ in range(args.repeats)])
        report("int8", B, [ours_once(model, idx, args.new_tokens) for _ in range(args.repeats)])


def tp_main(rng):
    from mpi4py import MPI

    from hpc_llm.parallel.grid import make_grid

    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    cfg = ModelConfig(**CFG)
    model = GPT(cfg, seed=0, tp_comm=make_grid(comm, P).tp_comm)
    for B in args.batch:
        idx = rng.integers(0, CFG["vocab_size"], size=(B, args.prompt_len))
        comm.Barrier()
        runs = [ours_once(model, idx, args.new_tokens) for _ in range(args.repeats)]
        if comm.rank == 0:
            report(f"TP{P}", B, runs)
    del model
    if comm.rank == 0:  # one rank alone, the others idle
        single = GPT(cfg, seed=0)
        for B in args.batch:
            idx = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=(B, args.prompt_len))
            report("TP1", B, [ours_once(single, idx, args.new_tokens) for _ in range(args.repeats)])
    comm.Barrier()


if __name__ == "__main__":
    sys.exit(main())
