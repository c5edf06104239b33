# The commands behind docs/planning_data/validation_modes.jsonl (docs/planning.md, "Memory at scale, measured"): peak
# memory per rank with sequence parallelism on and off, recompute none / selective / block and fp32 vs bf16 transfers,
# each beside the planner's prediction, on this 2-core machine (ranks oversubscribed: memory does not depend on the
# load). data/shakespeare_char is tinyshakespeare prepared with `hpc-llm prepare --tokenizer char`.
# Regenerate the table: python scripts/bench/validation_table.py docs/planning_data/validation_modes.jsonl
cd "$(dirname "$0")/../.."  # the repository root
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
OUT=${OUT:-/tmp/validation_modes.jsonl}; rm -f "$OUT"
V() { n=$1; shift; .venv/bin/mpiexec --oversubscribe -n "$n" .venv/bin/python scripts/bench/validate_plan.py \
    --data data/shakespeare_char --preset 6x384 --batch 8 --steps 3 --out "$OUT" --set model.dropout=0.1 "$@"; }
SP=parallel.sequence_parallel=true
# tp 2: sequence parallel off / on, recompute none / selective / block
V 2 --tp 2
V 2 --tp 2 --set train.recompute=selective
V 2 --tp 2 --set $SP
V 2 --tp 2 --set $SP --set train.recompute=selective
V 2 --tp 2 --set $SP --set train.recompute=block
# pp 2 x tp 2 (1F1B, 4 micro-batches)
V 4 --tp 2 --pp 2 --accum 4
V 4 --tp 2 --pp 2 --accum 4 --set $SP
V 4 --tp 2 --pp 2 --accum 4 --set $SP --set train.recompute=selective
# bf16: fp32 vs 16-bit transfers, with sequence parallelism
V 2 --tp 2 --set train.precision=bf16 --set $SP
V 2 --tp 2 --set train.precision=bf16 --set $SP --set parallel.act_comm=bf16
V 4 --tp 2 --pp 2 --accum 4 --set train.precision=bf16 --set $SP
V 4 --tp 2 --pp 2 --accum 4 --set train.precision=bf16 --set $SP --set parallel.act_comm=bf16
