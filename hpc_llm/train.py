"""The training loop: micro-batches, gradient accumulation, clipping, AdamW, eval, logging, checkpoints, resume.

Data flows one way: tokens -> model.forward -> loss -> model.backward -> (collectives, later) -> optimizer ->
checkpoint. Everything a resumed run needs to continue bit for bit is in the checkpoint: parameters, Adam moments and
step counter, the step (batches are a pure function of it), and the dropout RNG state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_llm import checkpoint as ckpt
from hpc_llm.backend import get_backend, keep_freed_memory, to_device, to_host
from hpc_llm.bench import matmul_peak_flops
from hpc_llm.config import Config, config_from_dict
from hpc_llm.data import TokenData, check_split_size, get_batch
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT
from hpc_llm.optim import AdamW, lr_at, sum_of_squares

log = logging.getLogger("hpc_llm")

TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2  # sampler streams: training batches, val eval, train eval


@dataclass
class Metrics:
    """The run's history, kept in memory, appended to metrics.jsonl and stored in every checkpoint."""

    train: dict = field(default_factory=lambda: {k: [] for k in
                                                  ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu")})
    eval: dict = field(default_factory=lambda: {k: [] for k in ("step", "train_loss", "val_loss")})

    def add(self, table: str, row: dict) -> None:
        t = getattr(self, table)
        for k in t:
            t[k].append(row[k])

    def as_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval}


def resolve_vocab(cfg: Config, data: TokenData) -> None:
    """model.vocab_size = 0 means the data's; an explicit one must hold every token id of the data."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                        f"({data.vocab_size}, from {data.path}/meta.json)")


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = cfg
        t = cfg.train
        self.xp = get_backend(t.backend)
        keep_freed_memory()
        self.data = TokenData(cfg.data.path)
        self.train_tokens = self.data.split("train")
        self.val_tokens = self.data.split("val")
        resume_path = self._resume_path(resume)
        saved = ckpt.load_checkpoint(resume_path) if resume_path else None
        if saved is not None:
            self._check_compatible(saved)
        resolve_vocab(cfg, self.data)
        check_split_size(self.train_tokens, cfg.model.block_size, "train")
        if t.eval_iters > 0:
            check_split_size(self.val_tokens, cfg.model.block_size, "val")
        self.out_dir = Path(t.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        self.model = GPT(cfg.model, self.xp, seed=t.seed)
        self.opt = AdamW(self.model.flat, self.model.grad_flat, self.model.decay_ranges(), t)
        self.rng = np.random.Generator(np.random.PCG64([t.seed, 0xD80])) # dropout masks
        self.step = 0
        self.metrics = Metrics()
        if saved is not None:
            self._restore(saved)
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
        self.peak_flops = t.peak_tflops * 1e12 or matmul_peak_flops(self.xp, self.model.dtype)

    # -- resume ---------------------------------------------------------------------------------------------------------

    def _resume_path(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            found = ckpt.find_latest(Path(self.cfg.train.out_dir))
            if found is None:
                log.info("resume auto: no verified checkpoint in %s, starting fresh", self.cfg.train.out_dir)
            return found
        return Path(resume)

    def _check_compatible(self, saved: ckpt.Checkpoint) -> None:
        """The model section must match the checkpoint's; training settings may change (e.g. a longer run)."""
        theirs = config_from_dict(saved.config).model
        mine = self.cfg.model
        if mine.vocab_size == 0:
            mine.vocab_size = theirs.vocab_size
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dtype"):
            if getattr(mine, k) != getattr(theirs, k):
                raise UserError(f"checkpoint {saved.path}: model.{k}={getattr(theirs, k)} but the config says "
                                f"{getattr(mine, k)}")

    def _restore(self, saved: ckpt.Checkpoint) -> None:
        self.model.load_state(saved.params)
        for slot, flat in (("m", self.opt.m), ("v", self.opt.v)):
            for s in self.model.specs:
                flat[s.offset:s.offset + s.size] = to_device(saved.optimizer[slot][s.name].reshape(-1), self.xp)
        st = saved.state
        self.step = st["step"]
        self.opt.t = st["adam_t"]
        self.rng.bit_generator.state = st["rng"]
        for table in ("train", "eval"):
            for k, v in saved.metrics.get(table, {}).items():
                getattr(self.metrics, table)[k] = list(np.asarray(v).tolist())
        log.info("resumed from %s at step %d", saved.path, self.step)

    # -- the loop -------------------------------------------------------------------------------------------------------

    def batch(self, tokens, step: int, micro: int, stream: int):
        c = self.cfg
        x, y = get_batch(tokens, c.model.block_size, c.train.batch_size, c.train.seed, step, micro, stream)
        return to_device(x, self.xp), to_device(y, self.xp)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm before clipping, lr)."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        loss = 0.0
        for micro in range(t.grad_accum):
            x, y = self.batch(self.train_tokens, self.step, micro, TRAIN_STREAM)
            loss += self.model.forward(x, y, rng=self.rng, keep_cache=True) / t.grad_accum
            self.model.backward(loss_scale=1.0 / t.grad_accum, accumulate=micro > 0)
        norm = math.sqrt(sum_of_squares(self.model.grad_flat))
        if not math.isfinite(loss) or not math.isfinite(norm):
            raise FloatingPointError(f"step {self.step}: loss {loss}, grad norm {norm} (lower train.lr?)")
        scale = min(1.0, t.grad_clip / (norm + 1e-6)) if t.grad_clip > 0 else 1.0
        self.opt.step(lr, grad_scale=scale)
        self.step += 1
        return loss, norm, lr

    def evaluate(self) -> dict:
        """Mean loss over eval_iters fixed batches of val and of train (the same batches at every eval)."""
        t = self.cfg.train
        out = {}
        for name, tokens, stream in (("val_loss", self.val_tokens, VAL_STREAM),
                                     ("train_loss", self.train_tokens, TRAIN_EVAL_STREAM)):
            losses = [self.model.forward(*self.batch(tokens, i, 0, stream)) for i in range(t.eval_iters)]
            out[name] = float(np.mean(losses))
        return out

    def save(self) -> Path:
        m = self.model
        path = ckpt.checkpoint_path(self.out_dir, self.step)
        params = {s.name: to_host(m.params[s.name]) for s in m.specs}
        optimizer = {slot: {s.name: to_host(flat[s.offset:s.offset + s.size].reshape(s.shape)) for s in m.specs}
                     for slot, flat in (("m", self.opt.m), ("v", self.opt.v))}
        state = {"step": self.step, "tokens_seen": self.step * self.tokens_per_step, "adam_t": self.opt.t,
                 "rng": self.rng.bit_generator.state, "tokenizer": self.data.tokenizer.meta(),
                 "data_path": str(self.data.path)}
        t0 = time.perf_counter()
        ckpt.save_checkpoint(path, params=params, optimizer=optimizer, state=state, config=self.cfg.to_dict(),
                             metrics=self.metrics.as_dict())
        ckpt.write_latest(self.out_dir, path)
        ckpt.prune_checkpoints(self.out_dir, self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s (%.2f s)", path, time.perf_counter() - t0)
        return path

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        m = self.model
        log.info("model: %d layers, %d heads, %d dim, block %d, vocab %d (padded %d), %.2fM parameters, %s, %s",
                 cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size, cfg.model.vocab_size,
                 cfg.model.padded_vocab, m.num_params / 1e6, cfg.model.dtype, t.backend)
        log.info("batch: %d sequences x %d micro-batches x %d tokens = %d tokens/step; MFU peak %.1f GFLOP/s",
                 t.batch_size, t.grad_accum, cfg.model.block_size, self.tokens_per_step, self.peak_flops / 1e9)
        metrics_file = open(self.out_dir / "metrics.jsonl", "a")
        flops_per_step = m.flops_per_token() * self.tokens_per_step
        last = {}
        try:
            window_t, window_steps = 0.0, 0
            while self.step < t.max_iters:
                if t.eval_iters > 0 and self.step % t.eval_interval == 0:
                    last = self._eval_and_log(metrics_file)
                t0 = time.perf_counter()
                loss, norm, lr = self.train_step()
                dt = time.perf_counter() - t0
                window_t += dt
                window_steps += 1
                row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                       "tokens_per_s": self.tokens_per_step / dt, "mfu": flops_per_step / dt / self.peak_flops}
                self.metrics.add("train", row)
                if self.step % t.log_interval == 0 or self.step == t.max_iters:
                    tps = self.tokens_per_step * window_steps / window_t
                    mfu = flops_per_step * window_steps / window_t / self.peak_flops
                    log.info("step %6d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tokens/s | MFU %.1f%% | "
                             "%.0f ms/step", self.step, loss, lr, norm, tps, 100 * mfu, 1000 * window_t / window_steps)
                    metrics_file.write(json.dumps({"kind": "train", **row, "tokens_per_s": tps, "mfu": mfu}) + "\n")
                    metrics_file.flush()
                    window_t, window_steps = 0.0, 0
                interval = self.cfg.checkpoint.interval
                if interval and self.step % interval == 0 and self.step < t.max_iters:  # the last one comes below
                    self.save()
            if t.eval_iters > 0:
                last = self._eval_and_log(metrics_file)
            path = self.save()
        finally:
            metrics_file.close()
        return {"step": self.step, "checkpoint": str(path), **last,
                "loss": self.metrics.train["loss"][-1] if self.metrics.train["loss"] else None}

    def _eval_and_log(self, metrics_file) -> dict:
        if self.metrics.eval["step"] and self.metrics.eval["step"][-1] == self.step:
            return {k: v[-1] for k, v in self.metrics.eval.items()}  # resumed right after this eval
        t0 = time.perf_counter()
        ev = self.evaluate()
        row = {"step": self.step, **ev}
        self.metrics.add("eval", row)
        log.info("eval %6d | train loss %.4f | val loss %.4f | %.1f s", self.step, ev["train_loss"], ev["val_loss"],
                 time.perf_counter() - t0)
        metrics_file.write(json.dumps({"kind": "eval", **row}) + "\n")
        metrics_file.flush()
        return row


def train(cfg: Config, resume: str | None = None) -> dict:
    return Trainer(cfg, resume).run()
