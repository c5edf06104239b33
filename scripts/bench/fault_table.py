"""Every fault tried on every verb: the expected and the observed outcome, the time to exit, and what survived
(docs/reliability.md's table).

    python scripts/bench/fault_table.py --data DIR [--repeats 1] [--only TEXT] [--json out.json]

DIR: a prepared byte-level corpus. Each case is one command (`mpiexec -n N python -m hpc_llm VERB ...`, or the
process alone at 1 rank) on a tiny model (2 layers x 32, block 16, 6 steps, checkpoints every 2, gather writer), with
HPC_LLM_FAULT set (hpc_llm/runtime/faults.py) or a real disk fault: a 16 MB tmpfs mounted for the case and filled to
16 KB ("full disk"), or mounted read-only (both need root; without it those cases say so and are not run). The time
is launch to exit, the ranks' start-up included. After each case: the newest checkpoint of the run (train) verifies
and no temporary file is left, and every input (data, checkpoints, run directories, corpus, Hugging Face directory)
is byte for byte as before. `--only TEXT` keeps the cases whose name contains TEXT; `--ci` the CI subset
(tests/runtime/test_fault_table.py runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
HF = REPO / "tests" / "fixtures" / "hf_gpt2_tiny"
NONZERO = (
    "non-zero"  # expected: any failure (a rank killed: the launcher's status, or the signal's)
)
LAYOUTS = {
    1: {"1 rank": []},
    2: {"dp2": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "train.grad_accum=2"]},
    4: {
        "dp2 x tp2, ZeRO-1": ["parallel.tp=2", "parallel.zero=1"],
        "pp2 x dp2": ["parallel.pp=2", "train.grad_accum=2"],
    },
}


class Case(NamedTuple):
    verb: str
    name: str
    layout: str
    ranks: int
    argv: str  # filled in: {cfg} {ckpt} {lora} {data} {corpus} {hf} {cluster} {out}
    fault: str = ""
    expect: object = 0  # exit status, or NONZERO
    disk: str = ""  # "full" / "ro": {out} and the run directory lie on such a tmpfs
    says: str = ""  # what the last `hpc-llm:` line says
    ci: bool = False


def _train_cases() -> list[Case]:
    timeout = ["--set", "parallel.comm_timeout_s=3"]
    # fmt: off
    faults = [
        # name, fault (R: the last rank), extra arguments, expected, fewest ranks
        ("none (a clean run of 6 steps)", "", [], 0, 1),
        ("exception in a step", "raise:step:R:3", [], 1, 1),
        ("exception in an eval", "raise:eval:R:3", [], 1, 1),
        ("exception while loading data", "raise:data:R", [], 1, 1),
        ("exception at start-up, before MPI", "raise:startup:R", [], NONZERO, 1),
        ("SIGKILL in a step", "kill:step:R:3", [], NONZERO, 1),
        ("disk full (ENOSPC, injected) in a save", "enospc:save:R:4", [], 1, 1),
        ("I/O error (EIO, injected) in a save", "eio:save:0:4", [], 1, 1),
        ("NaN gradient twice (max_bad_steps=2)", "nan:grad:R:3,nan:grad:R:4",
         ["--set", "train.max_bad_steps=2"], 1, 1),
        ("SIGUSR1 at start-up", "usr1:startup:R", [], 75, 1),
        ("SIGUSR1 in a step", "usr1:step:R:3", [], 75, 1),
        ("SIGUSR1 after the run (in MPI_Finalize)", "usr1late:exit:R", [], 0, 1),
        ("hang outside MPI in a step (3 s timeout)", "hang:step:R:3", timeout, 1, 2),
        ("SIGSTOP in a step (3 s timeout)", "stop:step:R:3", timeout, 1, 2),
        ("hang in the config agreement", "hang:config:R", ["--comm-timeout-s", "3"], 1, 2),
        ("hang before MPI_Init", "hang:startup:R", ["--comm-timeout-s", "3"], 1, 2),
    ]
    # fmt: on
    cases = []
    for name, fault, extra, expect, fewest in faults:
        for ranks, layouts in LAYOUTS.items():
            for layout, sets in layouts.items() if ranks >= fewest else ():
                argv = " ".join(["train {cfg}", *(f"--set {s}" for s in sets), *extra])
                spec = fault.replace(":R", f":{ranks - 1}")
                cases.append(Case("train", name, layout, ranks, argv, spec, expect))
    for ranks, layout in ((1, "1 rank"), (2, "dp2")):
        cases.append(
            Case(
                "train",
                "a real full disk (tmpfs) at the first save",
                layout,
                ranks,
                "train {cfg} --set train.out_dir={out}",
                expect=1,
                disk="full",
                ci=ranks == 2,
            )
        )
        cases.append(
            Case(
                "train",
                "a read-only run directory (tmpfs)",
                layout,
                ranks,
                "train {cfg} --set train.out_dir={out}",
                expect=2,
                disk="ro",
            )
        )
    return cases


GEN, EVAL, PREP = (
    "generate {ckpt} --max-new-tokens 4",
    "eval {ckpt} --data {data} --max-batches 2",
    "prepare {corpus} --out {out}",
)
TP2, T3 = " --set parallel.tp=2", " --comm-timeout-s 3"
# fmt: off
VERB_CASES = [
    # verb, fault's name, layout, ranks, argv, fault, expected exit, disk, what the last line says, in CI
    ("generate", "none", "1 rank", 1, GEN, "", 0, "", "", False),
    ("generate", "exception before decoding", "1 rank", 1, GEN, "raise:generate:0", 1, "", "", False),
    ("generate", "exception before decoding", "tp2", 2, GEN + TP2, "raise:generate:1", 1, "",
     "rank 1 failed in generate", False),
    ("generate", "hang before decoding", "tp2", 2, GEN + TP2 + T3, "hang:generate:1", 1, "", "", False),
    ("generate", "SIGKILL before decoding", "tp2", 2, GEN + TP2, "kill:generate:1", NONZERO, "", "", False),
    ("generate", "--out onto a file of its run directory", "1 rank", 1, GEN + " --out {ckpt}/latest --force",
     "", 2, "", "writing it would destroy it", False),
    ("generate", "--out onto a full disk", "1 rank", 1,
     "generate {ckpt} --max-new-tokens 128 --num-samples 32 --out {out}", "", 1, "full",
     "No space left on device", False),
    ("generate", "--out in a read-only directory", "1 rank", 1, GEN + " --out {out}", "", 2, "ro",
     "read-only filesystem", False),
    ("eval", "none", "1 rank", 1, EVAL, "", 0, "", "", False),
    ("eval", "exception before its batches", "dp2", 2, EVAL, "raise:eval:1", 1, "", "", False),
    ("eval", "hang before its batches", "dp2", 2, EVAL + T3, "hang:eval:1", 1, "", "", False),
    ("eval", "hang before its batches", "tp2", 2, EVAL + TP2 + T3, "hang:eval:1", 1, "", "", False),
    ("eval", "SIGKILL before its batches", "dp2", 2, EVAL, "kill:eval:1", NONZERO, "", "", True),
    ("prepare", "none", "2 ranks", 2, PREP, "", 0, "", "", False),
    ("prepare", "exception in the encode", "1 rank", 1, PREP, "raise:encode:0", 1, "", "", False),
    ("prepare", "exception in the encode", "2 ranks", 2, PREP, "raise:encode:1", 1, "", "", False),
    ("prepare", "hang in the encode", "2 ranks", 2, PREP + T3, "hang:encode:1", 1, "", "", False),
    ("prepare", "SIGKILL with its part files on disk", "2 ranks", 2, PREP, "kill:prepare:1", NONZERO, "", "",
     False),
    ("prepare", "onto a full disk", "1 rank", 1, PREP, "", 1, "full", "No space left on device", False),
    ("prepare", "into a read-only directory", "1 rank", 1, PREP, "", 2, "ro", "read-only filesystem", False),
    ("merge-lora", "none", "1 rank", 1, "merge-lora {lora} --out {out}", "", 0, "", "", False),
    ("merge-lora", "onto a full disk", "1 rank", 1, "merge-lora {lora} --out {out}", "", 2, "full",
     "No space left on device", False),
    ("merge-lora", "into a read-only directory", "1 rank", 1, "merge-lora {lora} --out {out}", "", 2, "ro",
     "read-only", False),
    ("merge-lora", "--out onto a checkpoint name in its run", "1 rank", 1,
     "merge-lora {lora} --out {lora}/ckpt_00000099.h5", "", 2, "", "newest checkpoint", False),
    ("import-gpt2", "none", "1 rank", 1, "import-gpt2 {hf} --out {out}", "", 0, "", "", False),
    ("import-gpt2", "onto a full disk", "1 rank", 1, "import-gpt2 {hf} --out {out}", "", NONZERO, "full",
     "No space left on device", False),
    ("plan", "a cluster file with NaN", "1 rank", 1, "plan {cfg} --gpus 8 --cluster {nan_cluster}", "", 2,
     "", "", False),
    ("inspect", "a corrupt checkpoint", "1 rank", 1, "inspect {corrupt}", "", 2, "", "", False),
]
# fmt: on


CASES = _train_cases() + [Case(*c) for c in VERB_CASES]


def config(data: Path, out: Path, path: Path) -> Path:
    path.write_text(f"""[model]\nn_layer = 2\nn_head = 4\nn_embd = 32\nblock_size = 16\n[data]\npath = "{data}"
[train]\nbatch_size = 4\nmax_iters = 6\neval_iters = 1\neval_interval = 3\npeak_tflops = 1.0\nout_dir = "{out}"
[checkpoint]\ninterval = 2\nwriter = "gather"\n[parallel]\nbucket_mb = 0.01\n""")
    return path


def launch(ranks: int, argv: list[str], fault: str, timeout: float = 300) -> tuple[float, int, str]:
    """(seconds to exit, exit status, stderr) of `python -m hpc_llm ARGV`, under mpiexec above 1 rank."""
    py = [sys.executable, "-m", "hpc_llm", *argv]
    mpi = [str(Path(sys.executable).parent / "mpiexec"), "--oversubscribe", "-n", str(ranks)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "HPC_LLM_FAULT": fault,
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")  # a container's root
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    t0 = time.monotonic()
    p = subprocess.run(
        (mpi if ranks > 1 else []) + py, env=env, capture_output=True, text=True, timeout=timeout
    )
    return time.monotonic() - t0, p.returncode, p.stderr


def digest(path: Path) -> str:
    """Every file under path (or path itself), hashed together with its name: an input's fingerprint."""
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return h.hexdigest()


def mount(path: Path, how: str) -> str:
    """A 16 MB tmpfs at path, filled to 16 KB ("full") or read-only ("ro"); "" or why not."""
    path.mkdir()
    opts = "size=16m" + (",ro" if how == "ro" else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode:
        return f"cannot mount a tmpfs (needs root): {r.stderr.strip()}"
    if how == "full":
        st = os.statvfs(path)
        (path / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (16 << 10)))
    return ""


class Inputs:
    """What the cases read, made once: the data, a one-step run (generate, eval), a LoRA run (merge-lora), a text
    corpus, a cluster file with a NaN, a corrupt checkpoint."""

    def __init__(self, data: Path, root: Path):
        self.root, self.data = root, data
        self.corpus = root / "corpus.txt"
        self.corpus.write_text((REPO / "README.md").read_text() * 4)
        self.nan_cluster = root / "nan.toml"
        text = (REPO / "inputs" / "clusters" / "h100_nvlink_ib400.toml").read_text()
        self.nan_cluster.write_text(text.replace("memory_bytes = 80e9", "memory_bytes = nan", 1))
        self.corrupt = root / "corrupt.h5"
        self.corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(4096))
        self.watched = [data, self.corpus, HF, self.nan_cluster]

    def run(self, name: str) -> Path:
        """A two-step run ("run"; "lora": with LoRA adapters), trained the first time a case names it."""
        path = self.root / name
        if not path.exists():
            sets = ["--set", "model.lora_rank=2"] if name == "lora" else []
            cfg = config(self.data, path, self.root / f"{name}.toml")
            rc, err = launch(1, ["train", str(cfg), "--set", "train.max_iters=2", *sets], "")[1:]
            if rc:
                raise SystemExit(f"fault_table: the {name} run for the verbs failed ({rc}): {err}")
            self.watched.append(path)
        return path

    def fill(self, argv: str, cfg: Path, out: Path) -> list[str]:
        runs = {
            k: self.run(name)
            for k, name in (("ckpt", "run"), ("lora", "lora"))
            if f"{{{k}}}" in argv
        }
        return argv.format(
            cfg=cfg,
            data=self.data,
            corpus=self.corpus,
            hf=HF,
            out=out,
            **runs,
            nan_cluster=self.nan_cluster,
            corrupt=self.corrupt,
        ).split()


def survived(run: Path) -> str:
    from hpc_llm.checkpoint import list_checkpoints, verify_checkpoint

    if not run.is_dir():
        return "no run directory"
    ckpts = list_checkpoints(run)
    left = [p.name for p in run.iterdir() if ".tmp" in p.name]
    if not ckpts:
        what = "no checkpoint"
    else:
        verify_checkpoint(ckpts[0][1])
        what = f"step {ckpts[0][0]} verifies"
    return what + (f"; left: {', '.join(left)}" if left else "")


def run_case(case: Case, inputs: Inputs) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fault_case_"))
    try:
        base = work
        if case.disk:
            why = mount(work / "disk", case.disk)
            if why:
                return {"skipped": why}
            base = work / "disk"
        out = base / ("run" if case.verb == "train" else "out")
        if case.verb == "merge-lora" or case.verb == "import-gpt2":
            out = base / "out.h5"
        cfg = config(inputs.data, work / "run", work / "run.toml")
        argv = inputs.fill(case.argv, cfg, out)
        before = [digest(p) for p in inputs.watched]
        seconds, rc, err = launch(case.ranks, argv, case.fault)
        intact = before == [digest(p) for p in inputs.watched]
        run = out if case.verb == "train" and case.disk else work / "run"
        given = [n for k, n in (("{ckpt}", "run"), ("{lora}", "lora")) if k in case.argv]
        if case.verb == "train":
            kept = survived(run)
        else:
            kept = survived(inputs.root / given[0]) if given else "(no checkpoint input)"
        lines = [
            ln for ln in err.splitlines() if ln.startswith("hpc-llm:") and "injecting" not in ln
        ]
        return {
            "rc": rc,
            "seconds": seconds,
            "kept": kept,
            "intact": intact,
            "line": lines[-1][:200] if lines else "",
        }
    finally:
        if case.disk:
            subprocess.run(["umount", "-l", str(work / "disk")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def expected(case: Case, rc: int) -> bool:
    return rc != 0 if case.expect == NONZERO else rc == case.expect


def row_of(case: Case, runs: list[dict]) -> dict:
    if "skipped" in runs[0]:
        return {**case._asdict(), "ok": None, "skipped": runs[0]["skipped"]}
    codes = sorted({r["rc"] for r in runs})
    ok = all(expected(case, r["rc"]) and r["intact"] and case.says in r["line"] for r in runs)
    times = [r["seconds"] for r in runs]
    return {
        **case._asdict(),
        "observed": codes,
        "ok": ok,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "kept": runs[-1]["kept"],
        "intact": all(r["intact"] for r in runs),
        "line": runs[-1]["line"],
    }


def markdown(row: dict) -> str:
    head = f"| {row['verb']} | {row['name']} | {row['layout']} ({row['ranks']}) | {row['expect']} |"
    if row["ok"] is None:
        return head + f" not run: {row['skipped']} | | | | |"
    observed = ", ".join(map(str, row["observed"]))
    return head + (
        f" {observed} | {row['median_s']:.1f} / {row['max_s']:.1f} | {row['kept']} |"
        f" {'yes' if row['intact'] else 'NO'} | {'yes' if row['ok'] else 'NO'} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared data directory")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--only", default="", help="only the cases whose name contains this")
    ap.add_argument("--ci", action="store_true", help="only the CI subset")
    args = ap.parse_args()
    cases = [c for c in CASES if args.only in f"{c.verb}: {c.name}" and (c.ci or not args.ci)]
    root = Path(tempfile.mkdtemp(prefix="fault_table_"))
    inputs = Inputs(Path(args.data).resolve(), root)
    print(
        "| verb | fault | layout (ranks) | expected exit | observed | time to exit, median / max (s) "
        "| newest checkpoint | inputs intact | as expected |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for case in cases:
        rows.append(row_of(case, [run_case(case, inputs) for _ in range(args.repeats)]))
        print(markdown(rows[-1]), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    ran = [r for r in rows if r["ok"] is not None]
    print(
        f"\n{sum(r['ok'] for r in ran)} of {len(ran)} cases as expected ({len(rows) - len(ran)} not run)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(r["ok"] for r in ran) else 1)


if __name__ == "__main__":
    main()
