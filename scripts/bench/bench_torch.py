#!/usr/bin/env python
"""Our training step against PyTorch's (eager and torch.compile) on the same cores, alternating in one run.

    python scripts/bench/bench_torch.py --torch-python PATH/TO/venv-with-torch/bin/python [--preset NAME] \
        [--precision bf16] [--rounds 5] [--steps 3] [--kinds ours,eager,compile,ours-dp2,ddp]
        # ours-nopool: ours with HPC_LLM_POOL=off (OpenBLAS's threads, serial kernels: kernels/pool.py)

Three worker processes hold one model each (ours: GPT + AdamW; PyTorch: the same GPT-2 architecture, nanoGPT's
layout, torch.optim.AdamW), built once; the driver asks them in turn for `--steps` timed steps, `--rounds` times, so
each sees the same machine, one at a time; medians over every timed step. bf16: ours rounds the matmul operands
and kept activations (train.precision = "bf16"), PyTorch runs under torch.autocast("cpu", bfloat16). Random
tokens, dropout 0, forward + backward + optimizer step. Data parallel on the same cores: `ours-dp2` is 2 MPI ranks of
one BLAS thread each running the Trainer (the `hpc-llm train` path: bucketed allreduce overlapped with backward),
`ddp` PyTorch's DistributedDataParallel over gloo, 2 processes of one thread each; each rank holds the preset's
batch, so a step moves twice the tokens (compare tokens/s); a step's time is the slower rank's. The torch
interpreter is another environment's (CI never has torch); ours is this one's. Never a test: record the figures in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def ours_worker(p: dict, precision: str):
    from bench_train import build

    from hpc_llm.backend import keep_freed_memory

    keep_freed_memory()
    return build(p, precision)[3]


def torch_worker(p: dict, precision: str, mode: str):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, H, T, V = p["n_embd"], p["n_head"], p["block_size"], -(-p["vocab_size"] // 64) * 64

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B = x.shape[0]
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(p["n_layer"]))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, tgt):
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for b in self.blocks:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, V).float(), tgt.view(-1))

    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if mode == "compile" else model
    if mode == "ddp":
        fwd = nn.parallel.DistributedDataParallel(model)
    idx = torch.randint(0, p["vocab_size"], (p["batch"], T))
    tgt = torch.randint(0, p["vocab_size"], (p["batch"], T))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = fwd(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_dp2_worker(p: dict, precision: str):
    """One rank of 2: the Trainer on random tokens; returns a step that ends when both ranks have (a barrier)."""
    from pathlib import Path

    from mpi4py import MPI

    from hpc_llm.train.trainer import Trainer

    from common import PRESETS, preset_config

    world = MPI.COMM_WORLD
    name = next(k for k, v in PRESETS.items() if v == p)
    tmp = world.bcast(tempfile.mkdtemp(prefix="hpc_llm_bench_") if world.rank == 0 else None)
    cfg = preset_config(world, name, Path(tmp), 2_000_000)
    cfg.train.batch_size = p["batch"] * world.size  # the preset's batch on each rank
    cfg.train.precision = precision
    tr = Trainer(cfg)

    def step():
        tr.train_step()
        world.Barrier()

    return step


def ddp_setup(rank: int):
    """PyTorch's two ranks: rank 0 is the driver's worker, rank 1 its child, fed the driver's lines."""

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    child = None
    if rank == 0:
        env = dict(os.environ, BENCH_DDP_RANK="1")
        child = subprocess.Popen(
            [sys.executable, *sys.argv], env=env, stdin=subprocess.PIPE, text=True
        )
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=2)
    return child


def worker(kind: str, p: dict, precision: str, fifo: str) -> None:
    """Build, warm up (torch.compile compiles here), then answer each line `N` with N step times (JSON). p: the
    preset's shape (JSON from the driver: the torch environment need not have our dependencies)."""

    rank, child = 0, None
    if kind == "ours-dp2":
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.rank
    elif kind == "ddp":
        rank = int(os.environ.get("BENCH_DDP_RANK", "0"))
    # rank 0 talks to the driver through two FIFOs (mpiexec's stdio forwarding would not do); a ddp rank 1 reads
    # rank 0's lines on stdin, an MPI rank 1 gets them by broadcast
    out = cmds = None
    if rank == 0:
        out = open(fifo + ".out", "w", buffering=1)  # noqa: SIM115 (held for the worker's life)
        cmds = open(fifo + ".cmd")  # noqa: SIM115
    elif kind == "ddp":
        cmds = sys.stdin
    if kind == "ours-dp2":
        step = ours_dp2_worker(p, precision)
    elif kind == "ddp":
        child = ddp_setup(rank)
        step = torch_worker(p, precision, kind)
    else:
        ours = kind in ("ours", "ours-nopool")
        step = ours_worker(p, precision) if ours else torch_worker(p, precision, kind)

    def say(line: str) -> None:
        if out is not None:
            print(line, file=out, flush=True)

    for _ in range(2):
        step()
    say("ready")
    lines = iter(cmds.readline, "") if cmds is not None else None
    while True:
        if kind == "ours-dp2":
            n = int(next(lines, "0")) if rank == 0 else None
            # wait for the driver asleep: a rank spinning in MPI would take a core from the worker being timed
            req = MPI.COMM_WORLD.Ibarrier()
            while not req.Test():
                time.sleep(0.002)
            n = MPI.COMM_WORLD.bcast(n)
        else:
            n = int(next(lines, "0"))
            if child is not None:
                child.stdin.write(f"{n}\n")
                child.stdin.flush()
        if n == 0:
            break
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        say(json.dumps(times))
    if child is not None:
        child.stdin.close()
        child.wait()


def connect(proc, fifo: str, kind: str):
    """The worker's two FIFOs, opened once it has said "ready". A worker that exits first (mpiexec refusing to
    start, an import error) ends the run with one line, not with the driver blocked on its FIFO for ever (holding
    the cores' lock)."""
    link: list = []

    def open_and_wait() -> None:
        link.extend((open(fifo + ".out"), open(fifo + ".cmd", "w")))  # noqa: SIM115 (the worker's life)
        link.append(link[0].readline().strip())

    waiter = threading.Thread(target=open_and_wait, daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(0.5)
        if waiter.is_alive() and proc.poll() is not None:
            sys.exit(
                f"bench_torch: the {kind} worker exited (status {proc.returncode}) before it was ready"
            )
    assert len(link) == 3 and link[2] == "ready", kind
    return link[0], link[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", required=True, help="an interpreter with torch installed")
    ap.add_argument("--preset", action="append", help="repeatable; default: all (common.PRESETS)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per worker per round")
    ap.add_argument("--kinds", default="ours,eager,compile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--fifo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.preset[0]), args.precision, args.fifo)
    from common import PRESETS

    tmp = tempfile.mkdtemp(prefix="bench_torch_")
    for preset in args.preset or list(PRESETS):
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        tokens = PRESETS[preset]["batch"] * PRESETS[preset]["block_size"]
        procs = {}
        for kind in args.kinds.split(","):
            exe = sys.executable if kind.startswith("ours") else args.torch_python
            launch = [exe]
            env = None
            if kind in ("ours-dp2", "ddp"):
                env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            if kind == "ours-nopool":
                env = dict(os.environ, HPC_LLM_POOL="off")
            if kind == "ours-dp2":
                launch = ["mpiexec", "-n", "2", "--bind-to", "none", exe]
            cmd = [
                *launch,
                __file__,
                "--worker",
                kind,
                "--preset",
                json.dumps(PRESETS[preset]),
                "--precision",
                args.precision,
                "--torch-python",
                args.torch_python,
            ]
            fifo = os.path.join(tmp, kind)
            for end in (".out", ".cmd"):
                os.mkfifo(fifo + end)
            cmd += ["--fifo", fifo]
            proc = subprocess.Popen(cmd, env=env)
            # one at a time: builds don't overlap
            procs[kind] = (proc, *connect(proc, fifo, kind))
        times = {k: [] for k in procs}
        for _ in range(args.rounds):
            for kind, (_, answers, asks) in procs.items():
                asks.write(f"{args.steps}\n")
                asks.flush()
                times[kind] += json.loads(answers.readline())
        for proc, answers, asks in procs.values():
            asks.write("0\n")
            asks.close()
            proc.wait()
            answers.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        # tokens/s: the data-parallel kinds move twice the preset's batch a step
        tps = {k: tokens * (2 if k in ("ours-dp2", "ddp") else 1) / t for k, t in med.items()}
        line = ", ".join(f"{k} {1e3 * t:.1f} ms ({tps[k]:.0f} tokens/s)" for k, t in med.items())
        base = "ours" if "ours" in tps else next(iter(tps))
        ratios = ", ".join(f"{base}/{k} {tps[base] / t:.2f}x" for k, t in tps.items() if k != base)
        if "ours-dp2" in tps and "ddp" in tps:
            ratios += f", ours-dp2/ddp {tps['ours-dp2'] / tps['ddp']:.2f}x"
        n = args.rounds * args.steps
        print(
            f"{preset} {args.precision}: {line} ({ratios}; medians of {n} steps each)", flush=True
        )


if __name__ == "__main__":
    main()
