#!/usr/bin/env python
"""Collective benchmark, the same as `hpc-llm bench comm` (the logic lives in hpc_llm/bench/comm.py).

mpiexec -n 2 python scripts/bench_comm.py --sizes 1K..256M --iters 20 --json comm.json
mpiexec -n 4 --oversubscribe python scripts/bench_comm.py --tp 2 --comms world,tp,dp --sizes 1K..16M
"""

import sys

from hpc_llm.bench.comm import main

if __name__ == "__main__":
    sys.exit(main())
