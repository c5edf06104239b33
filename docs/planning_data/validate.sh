# The commands behind docs/planning_data/validation.jsonl (docs/planning.md, "Validation on this machine"), as run on the idle
# 2-core machine: /tmp/sc is tinyshakespeare prepared with `hpc-llm prepare --tokenizer char`. The first line
# recalibrated inputs/clusters/this_machine.toml (committed); uptime before each run is in validation_load.txt.
# Regenerate the table: python scripts/bench/validation_table.py docs/planning_data/validation.jsonl --stored
cd "$(dirname "$0")/../.."  # the repository root
source /tmp/benv.sh
mpiexec -n 2 hpc-llm bench calibrate --out inputs/clusters/this_machine.toml --force > /tmp/calib2.log 2>&1
OUT=/tmp/validation2.jsonl; rm -f $OUT /tmp/validate2_load.txt /tmp/validate2_log.txt
V() { n=$1; shift; uptime >> /tmp/validate2_load.txt; .venv/bin/mpiexec --oversubscribe -n $n .venv/bin/python scripts/bench/validate_plan.py --data /tmp/sc --out $OUT "$@" >> /tmp/validate2_log.txt 2>&1; }
V 1 --preset shakespeare-char --batch 12 --steps 7
V 2 --preset shakespeare-char --batch 12 --steps 7
V 2 --preset shakespeare-char --batch 12 --tp 2 --steps 7
V 2 --preset shakespeare-char --batch 12 --pp 2 --accum 4 --steps 7
V 4 --preset shakespeare-char --batch 12 --zero 1 --steps 7
V 1 --preset 6x384 --batch 8 --steps 5
V 2 --preset 6x384 --batch 8 --zero 1 --bucket-mb 4 --steps 5
V 2 --preset 6x384 --batch 4 --pp 2 --accum 4 --schedule gpipe --steps 5
V 2 --preset 6x384 --batch 4 --pp 2 --accum 4 --schedule interleaved --virtual 3 --steps 5
V 4 --preset 6x384 --batch 8 --tp 2 --steps 4
V 1 --preset 6x384 --batch 8 --steps 5 --set train.recompute=block
V 1 --preset 6x384 --batch 8 --steps 5 --set train.precision=bf16
V 1 --preset gpt2-small --batch 1 --steps 3 --warmup 1
V 2 --preset gpt2-small --batch 1 --tp 2 --steps 3 --warmup 1
V 2 --preset gpt2-small --batch 2 --zero 1 --steps 3 --warmup 1
uptime >> /tmp/validate2_load.txt
echo done >> /tmp/validate2_log.txt
