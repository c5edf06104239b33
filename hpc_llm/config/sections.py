"""The run configuration's sections: one dataclass per TOML section, each field with its default and a comment on
what it means; and the pipeline's split of the layers into stages that the parallel section describes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from hpc_llm.runtime.faults import DEFAULT_COMM_TIMEOUT_S


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 0  # 0: take it from the prepared data's meta.json
    dropout: float = 0.0
    dtype: str = "float32"  # "float32" or "float64"
    bias: bool = True  # biases in the linear layers and LayerNorms (GPT-2: true; nanoGPT's shakespeare runs: false)
    # the widths a pruned model (`hpc-llm prune`, docs/compression.md) has: each head's size (0: n_embd / n_head,
    # GPT-2's) and the MLP's hidden width (0: 4 n_embd; Hugging Face GPT-2's n_inner)
    head_dim: int = 0
    n_inner: int = 0
    # LoRA (docs/fine-tuning.md): > 0 adds adapters A (in, r) and B (r, out) beside each target linear layer,
    # y = x W + b + (lora_alpha / lora_rank) x A B; every base parameter is then frozen, the adapters train
    lora_rank: int = 0
    # the adapters' scale is lora_alpha / lora_rank (PEFT's default alpha 8: 1.0 at rank 8)
    lora_alpha: float = 8.0
    # among checks.LORA_TARGETS
    lora_targets: list[str] = field(default_factory=lambda: ["attn.c_attn"])

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank > 0 else 0.0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def attn_width(self) -> int:
        """The attention's inner width: its heads side by side (n_embd, unless heads were pruned)."""
        return self.n_head * self.head_size

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of 64 (speed, and room for a TP split); pad logits are masked."""
        return -(-self.vocab_size // 64) * 64


@dataclass
class DataConfig:
    path: str = "data/stdlib"  # a directory written by `hpc-llm prepare`


@dataclass
class TrainConfig:
    # sequences per micro-batch (the whole micro-batch, over all data-parallel ranks)
    batch_size: int = 12
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    out_dir: str = "runs/default"
    backend: str = "numpy"
    # "selective": each block keeps all but attention's probabilities and dropout masks (Korthikanti et al.'s 5as^2b
    # term) and GELU's tanh, which backward recomputes from the kept q, k and GELU input; "block": backward recomputes
    # each block's forward from its input (keeps only that); "none"
    recompute: str = "none"
    # "fp32" (model.dtype's: also float64), "bf16" or "fp16": matmul operands and kept activations in that format,
    # fp32 master weights and moments (hpc_llm/model/precision.py)
    precision: str = "fp32"
    # fp16's dynamic loss scale: its start (2^16, as PyTorch's GradScaler)
    loss_scale_init: float = 65536.0
    # fp16: clean steps in a row before the scale doubles (Megatron's window)
    loss_scale_window: int = 1000
    # MFU denominator per rank (summed over ranks); 0: measure a float32 matmul at start
    peak_tflops: float = 0.0
    # a step whose loss or gradient norm is not finite is skipped on every rank; this many in a row stop the run with
    # a checkpoint of the last good state (fp16's loss-scaler overflows are counted apart: they are expected)
    max_bad_steps: int = 10
    # > 0: also skip a step whose loss exceeds the running mean of recent losses by this many standard deviations
    spike_sigma: float = 0.0
    # a checkpoint whose model weights start a fresh run (new optimizer state, step 0; "" : initialise from the seed);
    # --resume of this run's own checkpoints wins over it (docs/fine-tuning.md)
    init_from: str = ""
    # fnmatch patterns over parameter names (e.g. "h.*.attn.*", "wte.weight"): those parameters are not trained
    freeze: list[str] = field(default_factory=list)
    # knowledge distillation (docs/compression.md): a checkpoint or run directory (same tokenizer and vocabulary) whose
    # model teaches this one; the loss is distill_alpha T^2 KL(teacher_T || student_T) + (1 - distill_alpha) CE, T
    # distill_temperature; "": no teacher
    teacher: str = ""
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0


@dataclass
class ParallelConfig:
    # "auto": the planner picks tp, pp, zero, the schedule and the micro-batches for the ranks the job got, from the
    # cluster file `train --cluster` names (hpc_llm/plan/auto.py); "": as set below
    layout: str = ""
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size (stages); data-parallel size = number of ranks / (pp * tp)
    # layers of each pipeline stage in model order (pp * virtual_stages entries, summing to model.n_layer); empty: even
    pp_layers: list[int] = field(default_factory=list)
    # "1f1b", "interleaved" (needs virtual_stages >= 2), "gpipe", "zb-h1" (1F1B with each backward split in B
    # and W, the W's filling the bubble: docs/performance.md) or "zbv" (zero-bubble V: virtual_stages = 2, rank r
    # holds stages r and 2 pp - 1 - r)
    schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule; 2 for zbv)
    # Megatron's sequence parallelism (tp > 1): LayerNorm, dropout and the residual stream on a 1/tp slice of the
    # sequence; an all-gather enters each column-parallel region and a reduce-scatter leaves each row-parallel one
    sequence_parallel: bool = False
    # the format activations and their gradients cross pipeline stages in, and tensor-parallel collectives run in:
    # "fp32" (the compute dtype, as they are) or "bf16" / "fp16" (rounded to 16 bits: half the bytes; sums in fp32)
    act_comm: str = "fp32"
    # ZeRO over the data-parallel group (parallel/zero.py): 1 shards the Adam moments, 2 also the gradients (each
    # unit reduce-scattered as a micro-batch's backward finishes it), 3 also the parameters (FSDP: each unit
    # all-gathered before use, released after); 0: off
    zero: int = 0
    # ZeRO-3: free a unit's gathered parameters after its forward (true) or keep them for the backward that follows
    reshard_after_forward: bool = True
    bucket_mb: float = 25.0  # data-parallel gradient bucket size (MiB)
    # a rank waiting longer than this in one collective or transfer aborts the job, naming the operation; 0: never.
    # Until the config is read (start-up, its agreement) `hpc-llm train --comm-timeout-s` (the same default) holds
    comm_timeout_s: float = DEFAULT_COMM_TIMEOUT_S
    # the data-parallel gradient reduction: "fp32" (the gradients' dtype, uncompressed), "bf16" / "fp16" (16-bit
    # buckets, fp32 sums) or "powersgd" (low-rank, error feedback); hpc_llm/parallel/compression.py
    grad_comm: str = "fp32"
    powersgd_rank: int = 4  # PowerSGD's approximation rank r
    powersgd_start: int = 0  # steps reduced uncompressed (fp32) before PowerSGD starts


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 3
    # "gather": rank 0 writes the file with serial h5py; "mpio": all ranks write their share of it (h5py built with
    # MPI); "parts": every rank writes what it holds into a file of its own, joined by a master file of virtual
    # datasets; "auto": parts with several ranks or async_save, else gather. Plain h5py reads them all the same.
    writer: str = "auto"
    # save in the background (parts writer): each rank copies its share into host memory and training goes on
    async_save: bool = False
    # a save that fails (disk full, I/O error): "stop" the run, or "continue" without it
    on_error: str = "stop"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_vocab(self, vocab_size: int) -> Config:
        """A copy with model.vocab_size set (resolved from the data or a checkpoint); this config unchanged."""
        return dataclasses.replace(
            self, model=dataclasses.replace(self.model, vocab_size=vocab_size)
        )


def stage_layers(n_layer: int, stages: int, pp_layers: list[int] = ()) -> list[range]:
    """The layers of each (virtual) pipeline stage, in model order: as pp_layers gives, else evenly."""
    counts = list(pp_layers) or [n_layer // stages] * stages
    edges = [sum(counts[:i]) for i in range(stages + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(stages)]
