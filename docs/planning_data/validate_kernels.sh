# The commands behind docs/planning_data/kernels/ (docs/performance.md, "The planner prices the kernel layer (issue
# 29)"): for each round and thread count, in one hold of the quiet lock, the code before (BASE: a checkout of
# dfd7aa0) and this code calibrate, then the three presets run one rank each (validate_plan.py); the errors are the
# planner's on each calibration against those steps:
#   python scripts/bench/validation_table.py docs/planning_data/kernels/rN/measured_tT.jsonl \
#       --cluster docs/planning_data/kernels/rN/{before,after}_tT.toml
# DATA: tinyshakespeare prepared with `hpc-llm prepare --tokenizer char`. Run from the repository root.
BASE=${BASE:?a checkout of the code before}; DATA=${DATA:?a prepared data directory}; LOCK=${LOCK:-/tmp/quiet.lock}
for round in r8 r9 r10; do  # r4-r6: the same before [compute.gemm_wide]
  for th in 1 2; do
    D=docs/planning_data/kernels/$round; mkdir -p $D
    export OMP_NUM_THREADS=$th OPENBLAS_NUM_THREADS=$th
    flock $LOCK env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE chrt -r 1 bash -c "
      (cd $BASE && python -m hpc_llm.cli bench calibrate --out $PWD/$D/before_t$th.toml --force)
      python -m hpc_llm.cli bench calibrate --out $D/after_t$th.toml --force
      for spec in 'shakespeare-char 12 7 2' '6x384 8 5 2' 'gpt2-small 1 3 1'; do
        set -- \$spec
        python scripts/bench/validate_plan.py --data $DATA --preset \$1 --batch \$2 --steps \$3 --warmup \$4 \
          --cluster $D/after_t$th.toml --out $D/measured_t$th.jsonl
      done"
  done
done
