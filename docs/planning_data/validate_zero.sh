# The commands behind docs/planning_data/validation_zero.jsonl (docs/planning.md, "ZeRO-2 and ZeRO-3, measured"): peak
# memory per rank at dp 2 and 4 for parallel.zero = 0, 1, 2, 3 on the 6x384 and GPT-2-small shapes, each beside the
# planner's prediction, on this 2-core machine (ranks oversubscribed: memory does not depend on the load; the
# ZeRO-2/3 buffers' resident pages are read with mincore around each part, scripts/bench/validate_plan.py).
# data/shakespeare_char is tinyshakespeare prepared with `hpc-llm prepare --tokenizer char`; GPT-2 small's shape runs
# on it with its own vocabulary size (50304), the data's ids being a subset.
# Regenerate the table: python scripts/bench/validation_table.py docs/planning_data/validation_zero.jsonl
cd "$(dirname "$0")/../.."  # the repository root
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
OUT=${OUT:-/tmp/validation_zero.jsonl}; rm -f "$OUT"
V() { n=$1; shift; .venv/bin/mpiexec --oversubscribe -n "$n" .venv/bin/python scripts/bench/validate_plan.py \
    --data data/shakespeare_char --out "$OUT" "$@"; }
for dp in 2 4; do
    for z in 0 1 2 3; do
        V $dp --preset 6x384 --batch 8 --warmup 1 --steps 3 --zero $z --set model.dropout=0.1
    done
done
for dp in 2 4; do
    for z in 0 1 2 3; do
        V $dp --preset gpt2-small --batch 4 --warmup 0 --steps 1 --zero $z
    done
done
