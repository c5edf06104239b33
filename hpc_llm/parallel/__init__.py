"""Process grid and communication: every MPI call of hpc_llm lives in comm.py."""
