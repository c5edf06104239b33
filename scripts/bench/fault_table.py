"""Time to a clean exit for every injected fault (docs/reliability.md's table).

    python scripts/bench/fault_table.py --data DIR [--repeats 3] [--json out.json]

Each case runs `mpiexec -n N python -m hpc_llm train` on a tiny model (2 layers x 32, block 16, checkpoints every 2
steps) with HPC_LLM_FAULT set (hpc_llm/runtime/faults.py), `--repeats` times; the time is launch to the launcher's exit,
the start-up of the ranks included (the "none" row is a clean run of the same length for comparison). After each run the
newest checkpoint is verified (what survived). The case list mirrors tests/runtime/test_faults.py, which asserts the
outcomes.
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
    # name, fault, extra --set, expected exit status (None: any non-zero)
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


def config(data: Path, out: Path) -> Path:
    path = out.parent / "run.toml"
    path.write_text(f"""[model]\nn_layer = 2\nn_head = 4\nn_embd = 32\nblock_size = 16\n[data]\npath = "{data}"
[train]\nbatch_size = 4\nmax_iters = 6\neval_iters = 1\neval_interval = 3\npeak_tflops = 1.0\nout_dir = "{out}"
[checkpoint]\ninterval = 2\nwriter = "gather"\n[parallel]\nbucket_mb = 0.01\n""")
    return path


def run_case(data: Path, ranks: int, sets: list[str], fault: str) -> tuple[float, int, str]:
    from hpc_llm.checkpoint import list_checkpoints, verify_checkpoint

    work = Path(tempfile.mkdtemp(prefix="fault_table_"))
    try:
        cfg = config(data, work / "run")
        cmd = [
            str(Path(sys.executable).parent / "mpiexec"),
            "--oversubscribe",
            "-n",
            str(ranks),
            sys.executable,
            "-m",
            "hpc_llm",
            "train",
            str(cfg),
            *[a for s in sets for a in ("--set", s)],
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "HPC_LLM_FAULT": fault,
        }
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
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
        return seconds, proc.returncode, survived
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared data directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    rows = []
    print("| fault | layout | exit status | time to exit, median / max (s) | what survived |")
    print("| --- | --- | --- | --- | --- |")
    for name, fault, extra, expected in CASES:
        for layout, (ranks, sets) in LAYOUTS.items():
            runs = [
                run_case(Path(args.data), ranks, sets + extra, fault) for _ in range(args.repeats)
            ]
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
            rows.append(row)
            print(
                f"| {name} | {layout} ({ranks} ranks) | {', '.join(map(str, codes))}{'' if ok else ' (UNEXPECTED)'}"
                f" | {row['median_s']:.1f} / {row['max_s']:.1f} | {row['survived']} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
