"""Time to a clean exit for every injected fault (docs/reliability.md's table).

    python scripts/bench/fault_table.py --data DIR [--repeats 3] [--json out.json]

Each case runs `mpiexec -n N python -m hpc_llm train` on a tiny model (2 layers x 32, block 16, checkpoints every 2
steps) with HPC_LLM_FAULT set (hpc_llm/runtime/faults.py), `--repeats` times; the time is launch to the launcher's exit,
the start-up of the ranks included (the "none" row is a clean run of the same length for comparison). After each run the
newest checkpoint is verified (what survived). VERB_CASES then hang rank 1 of the other verbs that talk to other ranks
(generate at tp 2, eval at dp 2, prepare at 2 ranks) with `--comm-timeout-s 3`, on a one-step checkpoint trained first.
`--only TEXT` keeps the cases whose name contains TEXT. The case list mirrors tests/runtime/test_faults.py, which
asserts the outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {"dp2": (2, []), "dp2 x tp2, ZeRO-1": (4, ["parallel.tp=2", "parallel.zero=1"])}
CASES = [
    # name, fault, extra --set, expected exit status (None: any non-zero)[, extra arguments]
    ("none (a clean run of 6 steps)", "", [], 0),
    ("exception in a step, rank 1", "raise:step:1:3", [], 1),
    ("exception in an eval, rank 1", "raise:eval:1:3", [], 1),
    ("exception while loading data, rank 1", "raise:data:1", [], 1),
    ("exception at start-up before MPI, rank 1", "raise:startup:1", [], None),
    ("rank 1 SIGKILLed in a step", "kill:step:1:3", [], None),
    (
        "rank 1 hangs outside MPI (comm_timeout_s=3)",
        "hang:step:1:3",
        ["parallel.comm_timeout_s=3"],
        1,
    ),
    (
        "rank 1 hangs in the config agreement at start-up (--comm-timeout-s 3)",
        "hang:config:1",
        [],
        1,
        ["--comm-timeout-s", "3"],
    ),
    ("disk full (ENOSPC) in the save, rank 0", "enospc:save:0:4", [], 1),
    ("disk full (ENOSPC) in the save, rank 1", "enospc:save:1:4", [], 1),
    (
        "NaN gradient on rank 1, twice (max_bad_steps=2)",
        "nan:grad:1:3,nan:grad:1:4",
        ["train.max_bad_steps=2"],
        1,
    ),
    ("SIGUSR1 at start-up, rank 1", "usr1:startup:1", [], 75),
]


# the other verbs, at 2 ranks, rank 1 hung outside MPI: name, layout, fault, argv ({ckpt}, {data}, {text}, {out})
VERB_CASES = [
    (
        "generate: rank 1 hangs before decoding (--comm-timeout-s 3)",
        "tp2",
        "hang:generate:1",
        "generate {ckpt} --max-new-tokens 4 --set parallel.tp=2",
    ),
    (
        "eval: rank 1 hangs before its batches (--comm-timeout-s 3)",
        "dp2",
        "hang:eval:1",
        "eval {ckpt} --data {data} --set parallel.tp=1",
    ),
    (
        "prepare: rank 1 hangs in its encode (--comm-timeout-s 3)",
        "2 ranks",
        "hang:encode:1",
        "prepare {text} --out {out}",
    ),
]


def config(data: Path, out: Path) -> Path:
    path = out.parent / "run.toml"
    path.write_text(f"""[model]\nn_layer = 2\nn_head = 4\nn_embd = 32\nblock_size = 16\n[data]\npath = "{data}"
[train]\nbatch_size = 4\nmax_iters = 6\neval_iters = 1\neval_interval = 3\npeak_tflops = 1.0\nout_dir = "{out}"
[checkpoint]\ninterval = 2\nwriter = "gather"\n[parallel]\nbucket_mb = 0.01\n""")
    return path


def launch(ranks: int, argv: list[str], fault: str) -> tuple[float, int]:
    """`mpiexec -n ranks python -m hpc_llm ARGV` with HPC_LLM_FAULT=fault: (seconds to exit, exit status)."""
    cmd = [
        str(Path(sys.executable).parent / "mpiexec"),
        "--oversubscribe",
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpc_llm",
        *argv,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "HPC_LLM_FAULT": fault,
    }
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return time.monotonic() - t0, proc.returncode


def run_case(
    data: Path, ranks: int, sets: list[str], fault: str, args: list[str] = ()
) -> tuple[float, int, str]:
    from hpc_llm.checkpoint import list_checkpoints, verify_checkpoint

    work = Path(tempfile.mkdtemp(prefix="fault_table_"))
    try:
        cfg = config(data, work / "run")
        argv = ["train", str(cfg), *[a for s in sets for a in ("--set", s)], *args]
        seconds, returncode = launch(ranks, argv, fault)
        ckpts = sorted(list_checkpoints(work / "run")) if (work / "run").is_dir() else []
        if ckpts:
            verify_checkpoint(ckpts[-1][1])  # the newest
        survived = (
            f"newest checkpoint (step {ckpts[-1][0]}) verifies"
            if ckpts
            else "no checkpoint (none was due)"
        )
        if (work / "run").is_dir() and any(".tmp-" in p for p in os.listdir(work / "run")):
            survived += "; a temporary file is left"
        return seconds, returncode, survived
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_verb_case(data: Path, ckpt: Path, argv: str, fault: str) -> tuple[float, int, str]:
    work = Path(tempfile.mkdtemp(prefix="fault_table_"))
    try:
        filled = argv.format(ckpt=ckpt, data=data, text=__file__, out=work / "tokens")
        seconds, returncode = launch(2, [*filled.split(), "--comm-timeout-s", "3"], fault)
        left = (work / "tokens").is_dir() and any(".tmp" in p for p in os.listdir(work / "tokens"))
        return (
            seconds,
            returncode,
            "nothing written" + ("; a temporary file is left" if left else ""),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def row_of(name, fault, layout, ranks, runs, expected) -> dict:
    codes = sorted({rc for _, rc, _ in runs})
    ok = all((rc != 0) if expected is None else (rc == expected) for _, rc, _ in runs)
    times = [s for s, _, _ in runs]
    row = {
        "fault": name,
        "spec": fault,
        "layout": layout,
        "ranks": ranks,
        "exit": codes,
        "ok": ok,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "survived": runs[-1][2],
    }
    print(
        f"| {name} | {layout} ({ranks} ranks) | {', '.join(map(str, codes))}{'' if ok else ' (UNEXPECTED)'}"
        f" | {row['median_s']:.1f} / {row['max_s']:.1f} | {row['survived']} |",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared data directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--only", default="", help="only the cases whose name contains this")
    args = ap.parse_args()
    rows = []
    print("| fault | layout | exit status | time to exit, median / max (s) | what survived |")
    print("| --- | --- | --- | --- | --- |")
    for name, fault, extra, expected, *more in CASES:
        if args.only not in name:
            continue
        for layout, (ranks, sets) in LAYOUTS.items():
            runs = [
                run_case(Path(args.data), ranks, sets + extra, fault, *more)
                for _ in range(args.repeats)
            ]
            rows.append(row_of(name, fault, layout, ranks, runs, expected))
    verb_cases = [c for c in VERB_CASES if args.only in c[0]]
    if verb_cases:
        work = Path(tempfile.mkdtemp(prefix="fault_table_ckpt_"))
        cfg = config(Path(args.data), work / "run")
        if launch(1, ["train", str(cfg), "--set", "train.max_iters=1"], "")[1] != 0:
            raise SystemExit("fault_table: the one-step run for generate and eval failed")
        for name, layout, fault, argv in verb_cases:
            runs = [
                run_verb_case(Path(args.data), work / "run", argv, fault)
                for _ in range(args.repeats)
            ]
            rows.append(row_of(name, fault, layout, 2, runs, 1))
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
