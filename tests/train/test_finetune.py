"""Fine-tuning: train.init_from (a checkpoint's weights start a fresh run, at any layout), train.freeze
(frozen parameters: no optimizer state, bitwise unchanged) and LoRA (adapters in the flat buffer, sharded like the
layer they adapt, `hpc-llm merge-lora`).

Tolerances. Data movement (init_from's reads, frozen parameters) is bitwise. LoRA's gradients against the five-point
stencil (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h in float64, per entry: |numeric - analytic| <= FD_RTOL |g|
+ FD_ATOL. Rounding: each loss carries an error of at most K u S (u = 2^-53, S the loss, ~4 here; K = FD_ATOL_ULPS =
32 ulps of accumulated forward rounding, measured ~1), which the stencil's weights (18/12) over h turn into FD_ATOL =
1.5 K u S / h = 2.2e-10 at h = FD_H = 1e-4. Truncation: h^4/30 |f^(5)| = 3e-18 |f^(5)|, inside FD_RTOL |g| = 1e-7 |g|
for any fifth derivative below 3e10 |g| (central differences at h = 1e-5 had a truncation error h^2/6 |f'''| of up to
5e-9 here, above their rounding bound: no atol could be derived for them). Measured worst |numeric - analytic|: 8e-12,
within the rounding bound. TP2 against tp1: the same
arithmetic but the order of sums, normwise max |got - want| <= 1e-12 max |want| per tensor (measured: 1.4e-14; the
per-entry 64 u bound of tests/model/test_tensor_parallel.py is exceeded 2x here, where random B of 0.3 makes the
adapters' terms larger than the gradients they sum to). The merged model against
the adapters: W + s A B formed in float64 and rounded once, then x (W + s A B) against x W + s (x A) B: a few
float64 roundings of the logits, 1e-10 relative normwise. Parallel runs against the single process: float64,
helpers.F64_RTOL = 1e-10, as tests/parallel/test_parallel.py derives it (losses, norms, every parameter).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import check, mismatch, reference_checks, rel_diff, replica_checks, run_config, train
from mpi4py import MPI

import hpc_llm
from hpc_llm.checkpoint import load_checkpoint
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layout import is_lora
from hpc_llm.parallel.grid import make_grid, single_process_grid
from hpc_llm.tools.merge_lora import merge_lora
from hpc_llm.train.trainer import Trainer

ALL_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
FD_H, FD_ENTRIES, FD_RTOL, FD_ATOL_ULPS = 1e-4, 12, 1e-7, 32
LORA = {"model.lora_rank": 4, "model.lora_alpha": 6.0, "model.lora_targets": ALL_TARGETS}


def run(cfg, resume=None) -> Trainer:
    tr = Trainer(cfg, resume=resume)
    tr.summary = tr.run()
    return tr


def params_of(tr) -> dict:
    return tr.model.full_tensors(tr.model.flat)


def initial_params(cfg, plan=None) -> dict:
    """The full tensors a fresh run of cfg starts from (the data's vocabulary: 256 bytes)."""
    model = GPT(
        dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 256),
        seed=cfg.train.seed,
        plan=plan,
    )
    return model.full_tensors(model.flat)


# -- init_from ---------------------------------------------------------------------------------------------------------


@pytest.mark.parallel(nprocs=2)
def test_init_from_reads_the_weights_at_another_layout(data_dir, tmp_path, shared_tmp_path):
    """A tp2 run's checkpoint and a dp2 ZeRO-1 run's start fresh runs at tp2 and at one process: the weights loaded
    equal the checkpoint's bitwise, the optimizer state is fresh (step 0, zero moments); block_size 8 < 16 takes wpe's
    first 8 rows; train.init_from of a directory takes its newest checkpoint."""
    world = MPI.COMM_WORLD
    bad = []
    for name, layout in (("tp2", {"parallel.tp": 2}), ("dp2-zero1", {"parallel.zero": 1})):
        src = train(
            run_config(
                data_dir, shared_tmp_path / f"src-{name}", **layout, **{"train.max_iters": 2}
            ),
            make_grid(world, layout.get("parallel.tp", 1)),
        )
        path = src.summary["checkpoint"]
        want = load_checkpoint(path, optimizer=False).params
        starts = {
            "tp2": (make_grid(world, 2), {"parallel.tp": 2}, shared_tmp_path / f"tp2-from-{name}"),
            "one process": (single_process_grid(), {}, tmp_path / f"one-from-{name}"),
        }
        for where, (grid, lay, out) in starts.items():
            for block, init in ((16, path), (8, str(shared_tmp_path / f"src-{name}"))):
                cfg = run_config(
                    data_dir,
                    f"{out}-{block}",
                    **lay,
                    **{"train.init_from": init, "model.block_size": block},
                )
                tr = Trainer(cfg, grid=grid)
                w = f"init_from {name} checkpoint at {where}, block {block}"
                got = params_of(tr)
                for pname, g in got.items():
                    ref = want[pname][:block] if pname == "wpe.weight" else want[pname]
                    if not np.array_equal(g, ref):
                        bad.append(f"{w}: {pname} differs from the checkpoint's")
                if (
                    tr.step != 0
                    or tr.opt.t != 0
                    or np.any(tr.opt.m)
                    or np.any(tr.opt.v)
                    or tr.metrics.train["step"]
                ):
                    bad.append(
                        f"{w}: not a fresh optimizer state (step {tr.step}, adam t {tr.opt.t})"
                    )
                tr.close()
    check(not bad, "\n".join(bad))


def test_init_from_checks(make_cfg):
    """Another model or a larger block_size is refused before any compute; a model trained on a checkpoint it was
    initialised from does not change the checkpoint."""
    src = run(make_cfg("src", **{"train.max_iters": 1}))
    path = src.summary["checkpoint"]
    with pytest.raises(
        UserError, match="train.init_from: checkpoint .*model.n_layer=2 but the config says 3"
    ):
        Trainer(make_cfg("a", **{"train.init_from": path, "model.n_layer": 3}))
    with pytest.raises(UserError, match="model.block_size=32 is larger than the checkpoint's 16"):
        Trainer(make_cfg("b", **{"train.init_from": path, "model.block_size": 32}))
    with pytest.raises(
        UserError, match="train.init_from: .*nope.h5: checkpoint file does not exist"
    ):
        Trainer(make_cfg("c", **{"train.init_from": "nope.h5"}))


def test_opened_checkpoints_closed_when_a_later_check_fails(make_cfg, monkeypatch):
    """train.init_from's file, or --resume's, opened by the start-up checks, is closed when a check after it fails
    (the layout's, made to fail here)."""
    import hpc_llm.train.startup
    from hpc_llm.checkpoint import CheckpointFile

    path = run(make_cfg("src", **{"train.max_iters": 1})).summary["checkpoint"]
    closed, close = [], CheckpointFile.close
    monkeypatch.setattr(
        CheckpointFile, "close", lambda self: (closed.append(str(self.path)), close(self))[1]
    )

    def check_layout(*args):
        raise UserError("a later check failed")

    monkeypatch.setattr(hpc_llm.train.startup, "check_layout", check_layout)
    with pytest.raises(UserError, match="a later check failed"):
        Trainer(make_cfg("a", **{"train.init_from": path}))
    with pytest.raises(UserError, match="a later check failed"):
        Trainer(make_cfg("b"), resume=path)
    assert closed == [str(path), str(path)]


def test_preempted_finetuning_run_resumes_its_own_checkpoint(make_cfg):
    """A LoRA run started from init_from, stopped after K steps and resumed (--resume auto, the same config, init_from
    still set) continues from its own checkpoint: bitwise the uninterrupted run, the adapters included."""
    base = run(make_cfg("base", **{"train.max_iters": 3})).summary["checkpoint"]
    common = {**LORA, "train.init_from": base, "train.eval_interval": 2}
    full = run(make_cfg("full", **common, **{"train.max_iters": 4}))
    run(make_cfg("part", **common, **{"train.max_iters": 2}))
    resumed = run(make_cfg("part", **common, **{"train.max_iters": 4}), resume="auto")
    assert resumed.metrics.train["loss"] == full.metrics.train["loss"]
    assert resumed.metrics.eval == full.metrics.eval
    a, b = params_of(resumed), params_of(full)
    assert all(np.array_equal(a[n], b[n]) for n in b)
    assert np.array_equal(resumed.opt.m, full.opt.m) and np.array_equal(resumed.opt.v, full.opt.v)
    assert np.any(b["h.1.mlp.c_proj.lora_B"] != 0)


# -- freezing ----------------------------------------------------------------------------------------------------------


FREEZE = {"train.freeze": ["h.0.*", "wpe.weight", "ln_f.*"]}


def frozen_checks(tr, initial: dict, name: str) -> list[str]:
    """Frozen parameters bitwise their initial values, the trained ones changed; moments only for trained ranges."""
    bad = []
    got = params_of(tr)
    for pname, g in got.items():
        if (pname in tr.model.frozen) != np.array_equal(g, initial[pname]):
            bad.append(
                f"{name}: {pname} ({'frozen' if pname in tr.model.frozen else 'trained'}) "
                f"{'changed' if pname in tr.model.frozen else 'unchanged'}"
            )
    trained = sum(s.size for s in tr.model.specs if s.name not in tr.model.frozen)
    total = tr.grid.dp_comm.mpi.allreduce(tr.opt.m.size) if tr.sync.zero else tr.opt.m.size
    if total != trained or tr.opt.v.size != tr.opt.m.size:
        bad.append(
            f"{name}: {total} moment elements (m) over the DP group, {trained} trained parameters"
        )
    return bad


def test_frozen_parameters_stay_bitwise_unchanged(make_cfg):
    cfg = make_cfg(**FREEZE, **{"train.max_iters": 3})
    initial = initial_params(cfg)
    tr = run(cfg)
    assert {
        "h.0.attn.c_attn.weight",
        "h.0.ln_1.bias",
        "wpe.weight",
        "ln_f.weight",
    } <= tr.model.frozen
    assert "h.1.attn.c_attn.weight" not in tr.model.frozen and "wte.weight" not in tr.model.frozen
    bad = frozen_checks(tr, initial, "single process")
    assert not bad, bad
    assert tr.opt.m.nbytes < 0.8 * tr.model.flat.nbytes  # h.0 is a third of the parameters
    # the checkpoint stores the frozen parameters' moments as zeros (docs/checkpoint-format.md)
    saved = load_checkpoint(tr.summary["checkpoint"])
    assert not np.any(saved.optimizer["m"]["h.0.mlp.c_fc.weight"]) and np.any(
        saved.optimizer["m"]["wte.weight"]
    )


def test_freeze_pattern_matching_nothing(make_cfg):
    with pytest.raises(UserError, match="train.freeze: pattern 'h.9.*' matches no parameter"):
        Trainer(make_cfg(**{"train.freeze": ["h.9.*"]}))


def test_nothing_left_to_train_is_refused(make_cfg):
    """Patterns that freeze every parameter, or (LoRA: the base frozen) every adapter, are refused; one adapter left
    trains."""
    with pytest.raises(
        UserError, match=r"train.freeze: \['\*'\] freezes every parameter: nothing left to train"
    ):
        Trainer(make_cfg(**{"train.freeze": ["*"]}))
    with pytest.raises(UserError, match="also cover every LoRA adapter"):
        Trainer(make_cfg(**LORA, **{"train.freeze": ["h.*.lora_A", "h.*.lora_B"]}))
    tr = Trainer(
        make_cfg(
            **LORA, **{"train.freeze": ["h.0.*", "h.1.attn.*", "h.1.mlp.c_fc.*", "h.1.*.lora_A"]}
        )
    )
    # that B alone
    assert tr.model.num_trainable == np.prod(tr.model.logical["h.1.mlp.c_proj.lora_B"])
    tr.close()


@pytest.mark.parallel(nprocs=2)
def test_frozen_dp2_zero1_equals_single_process_and_resumes_elsewhere(
    data_dir, tmp_path, shared_tmp_path
):
    """dp2 ZeRO-1 with frozen parameters: the single process's run (float64), frozen parameters bitwise unchanged,
    each rank's moments only for its shard's trained ranges; its checkpoint resumes at one process on the
    uninterrupted curve."""
    world = MPI.COMM_WORLD
    common = {**FREEZE, "model.dtype": "float64", "train.eval_interval": 2}
    ref = train(
        run_config(data_dir, tmp_path / "ref", **common, **{"train.max_iters": 4}),
        single_process_grid(),
    )
    cfg = run_config(
        data_dir, shared_tmp_path / "dp2", **common, **{"parallel.zero": 1, "train.max_iters": 2}
    )
    initial = initial_params(cfg)
    tr = train(cfg, make_grid(world, 1))
    bad = frozen_checks(tr, initial, "dp2 zero1") + replica_checks(tr)
    bad += reference_checks(
        tr,
        train(
            run_config(data_dir, tmp_path / "ref2", **common, **{"train.max_iters": 2}),
            single_process_grid(),
        ),
        "dp2 zero1",
    )
    resumed = train(
        run_config(data_dir, tmp_path / "resumed", **common, **{"train.max_iters": 4}),
        single_process_grid(),
        resume=tr.summary["checkpoint"],
    )
    bad += reference_checks(resumed, ref, "resumed at one process", steps=slice(2, None))
    bad += frozen_checks(resumed, initial, "resumed at one process")
    check(not bad, "\n".join(bad))


# -- LoRA --------------------------------------------------------------------------------------------------------------


def lora_model(tp_comm=None, seed=3) -> GPT:
    """A float64 2-layer model with adapters on every target, B random (at B = 0 the gradients of A vanish)."""
    cfg = ModelConfig(
        n_layer=2,
        n_head=4,
        n_embd=16,
        block_size=8,
        vocab_size=64,
        dtype="float64",
        lora_rank=3,
        lora_alpha=4.5,
        lora_targets=list(ALL_TARGETS),
    )
    model = GPT(cfg, seed=seed, tp_comm=tp_comm)
    rng = np.random.default_rng(seed)
    full = {
        n: rng.standard_normal(shape) * 0.3
        for n, shape in model.logical.items()
        if n.endswith(".lora_B")
    }
    for s in model.specs:
        if s.name in full:
            model.local_view(model.flat, s)[...] = model.shard(full[s.name], s)
    return model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 64, (3, 8)), rng.integers(0, 64, (3, 8))


def test_lora_specs_and_start_equal_base():
    cfg = ModelConfig(
        n_layer=1,
        n_head=2,
        n_embd=8,
        block_size=4,
        vocab_size=16,
        lora_rank=2,
        lora_targets=["attn.c_attn", "mlp.c_proj"],
    )
    specs = {s.name: s for s in GPT(cfg).specs}
    a, b = specs["h.0.attn.c_attn.lora_A"], specs["h.0.attn.c_attn.lora_B"]
    assert (a.shape, a.tp_axis, b.shape, b.tp_axis, b.tp_blocks) == ((8, 2), None, (2, 24), 1, 3)
    a, b = specs["h.0.mlp.c_proj.lora_A"], specs["h.0.mlp.c_proj.lora_B"]
    assert (a.shape, a.tp_axis, b.shape, b.tp_axis) == ((32, 2), 0, (2, 8), None)
    assert "h.0.attn.c_proj.lora_A" not in specs
    # B = 0 at the start: the adapted model computes the base model's logits exactly
    lora, base = GPT(cfg, seed=5), GPT(ModelConfig(**{**vars(cfg), "lora_rank": 0}), seed=5)
    idx = np.arange(8).reshape(2, 4) % 16
    assert np.array_equal(lora.logits(idx), base.logits(idx))
    assert lora.frozen == {n for n in lora.logical if not is_lora(n)}


def test_lora_gradients_match_finite_differences():
    """FD_ENTRIES entries of every adapter tensor (its largest gradient among them) against the five-point stencil,
    each within FD_RTOL |g| + FD_ATOL (the module docstring)."""
    model = lora_model()
    idx, tgt = batch()
    grads = model.gradients(idx, tgt)
    rng = np.random.default_rng(1)
    h = FD_H
    atol = 1.5 * FD_ATOL_ULPS * (np.finfo(np.float64).eps / 2) * abs(model.loss(idx, tgt)) / h

    def loss_at(p, i, x):
        old = p[i]
        p[i] = x
        value = model.loss(idx, tgt)
        p[i] = old
        return value

    checked = 0
    for name in (n for n in model.params if is_lora(n)):
        p, g = model.params[name], grads[name]
        assert np.max(np.abs(g)) > 0, name
        entries = {tuple(int(k) for k in np.unravel_index(int(np.argmax(np.abs(g))), p.shape))}
        while len(entries) < FD_ENTRIES:
            entries.add(tuple(int(rng.integers(0, n)) for n in p.shape))
        for i in sorted(entries):
            x = float(p[i])
            fd = (
                8 * (loss_at(p, i, x + h) - loss_at(p, i, x - h))
                - (loss_at(p, i, x + 2 * h) - loss_at(p, i, x - 2 * h))
            ) / (12 * h)
            assert abs(fd - g[i]) <= FD_RTOL * abs(g[i]) + atol, (name, i, g[i], fd, atol)
            checked += 1
    assert checked == FD_ENTRIES * sum(is_lora(n) for n in model.params)
    # the frozen base weights get no gradient computed, nor the frozen tied embedding (head and embedding)
    assert not np.any(grads["h.0.attn.c_attn.weight"]) and not np.any(grads["h.1.mlp.c_fc.weight"])
    assert not np.any(grads["wte.weight"])


@pytest.mark.parallel(nprocs=2)
def test_lora_tp2_gradients_equal_single_process():
    grid = make_grid(MPI.COMM_WORLD, 2)
    model, ref = lora_model(grid.tp_comm), lora_model()
    idx, tgt = batch()
    bad = []
    loss, want = model.loss(idx, tgt), ref.loss(idx, tgt)
    if not abs(loss - want) <= 1e-12 * abs(want):
        bad.append(f"loss {loss!r} vs single process {want!r}")
    model.gradients(idx, tgt)
    grads, want = model.full_tensors(model.grad_flat), ref.gradients(idx, tgt)
    for name in (n for n in want if is_lora(n) or "ln_" in n):
        bad += mismatch(grads[name], want[name], f"tp2 gradient {name}", rtol=1e-12)
    check(not bad, "\n".join(bad))


def test_merged_model_equals_adapters(make_cfg, tmp_path):
    cfg = make_cfg("lora", **LORA, **{"model.dtype": "float64", "train.max_iters": 3})
    tr = run(cfg)
    path = tr.summary["checkpoint"]
    adapters = hpc_llm.load_model(path)
    assert np.any(adapters.params["h.0.attn.c_attn.lora_B"] != 0)
    merged_path = merge_lora(path, tmp_path / "merged.h5")
    merged = hpc_llm.load_model(merged_path)
    assert merged.cfg.lora_rank == 0 and not any(is_lora(n) for n in merged.params)
    idx = np.random.default_rng(0).integers(0, 256, (2, 16))
    want, got = adapters.logits(idx), merged.logits(idx)
    assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(want))
    # the merged checkpoint starts a fresh plain run (init_from), and is refused where a LoRA config expects adapters
    fresh = Trainer(
        make_cfg("fresh", **{"model.dtype": "float64", "train.init_from": str(merged_path)})
    )
    assert np.array_equal(fresh.model.logits(idx), got)
    fresh.close()
    with pytest.raises(UserError, match="has no LoRA adapters"):
        merge_lora(merged_path, tmp_path / "again.h5")
    with pytest.raises(
        UserError, match="fold them into the weights with `hpc-llm merge-lora` first"
    ):
        Trainer(make_cfg("plain", **{"model.dtype": "float64", "train.init_from": path}))


def test_frozen_tied_embedding_gradient_is_skipped(make_cfg):
    """LoRA freezes wte: the tied head's dW GEMM and the embedding's scatter are skipped (their Param has no
    gradient), and the run is bitwise the one that computes that gradient (the old path, put back by giving the head
    and the embedding wte's gradient view again): losses, norms, every parameter; wte's gradient buffer stays zero
    there and is written by the old path (what the skip saves)."""
    runs = {}
    for name in ("skip", "computed"):
        tr = Trainer(make_cfg(name, **LORA, **{"train.max_iters": 3, "model.dropout": 0.1}))
        chunk = tr.model.chunks[0]
        assert chunk.head.wte.grad is None and chunk.embedding.wte.grad is None
        if name == "computed":
            chunk.head.wte = chunk.embedding.wte = tr.model._param("wte.weight")
        tr.summary = tr.run()
        runs[name] = tr
    skip, computed = runs["skip"], runs["computed"]
    assert skip.metrics.train["loss"] == computed.metrics.train["loss"]
    assert skip.metrics.train["grad_norm"] == computed.metrics.train["grad_norm"]
    a, b = params_of(skip), params_of(computed)
    assert all(np.array_equal(a[n], b[n]) for n in b)
    assert not np.any(skip.model.grads["wte.weight"]) and np.any(computed.model.grads["wte.weight"])


def test_lora_targets_in_any_order(make_cfg):
    """model.lora_targets names a set of layers: validation lists them in the model's order, and a checkpoint whose
    config lists them in another (written before that) is resumed, and taken by train.init_from, as the same
    adapters."""
    reordered = ALL_TARGETS[::-1]
    assert (
        make_cfg("v", **{**LORA, "model.lora_targets": reordered}).model.lora_targets == ALL_TARGETS
    )
    with pytest.raises(UserError, match="model.lora_targets: expected distinct names"):
        make_cfg("v", **{**LORA, "model.lora_targets": ["mlp.c_fc", "attn.c_attn", "mlp.c_fc"]})
    cfg = make_cfg("part", **LORA, **{"train.max_iters": 1})
    cfg.model.lora_targets = reordered  # as an older checkpoint's config may list them
    path = run(cfg).summary["checkpoint"]
    assert load_checkpoint(path, optimizer=False).config["model"]["lora_targets"] == reordered
    resumed = run(make_cfg("part", **LORA, **{"train.max_iters": 2}), resume="auto")
    assert resumed.metrics.train["step"] == [1, 2]
    fresh = Trainer(make_cfg("fresh", **LORA, **{"train.init_from": path}))
    want, got = load_checkpoint(path, optimizer=False).params, params_of(fresh)
    assert np.any(want["h.0.attn.c_attn.lora_B"]) and all(
        np.array_equal(got[n], want[n]) for n in want
    )
    fresh.close()


def test_lora_base_frozen_recompute_and_bf16(make_cfg):
    """LoRA trains the adapters only: the base bitwise unchanged; train.recompute=block gives the same run bitwise;
    bf16 runs (operands through the Precision) with finite losses and the base unchanged."""
    base = run(make_cfg("base", **{"train.max_iters": 2})).summary["checkpoint"]
    want = load_checkpoint(base, optimizer=False).params
    runs = {}
    for name, extra in (
        ("plain", {}),
        ("recompute", {"train.recompute": "block"}),
        ("bf16", {"train.precision": "bf16"}),
    ):
        tr = run(make_cfg(name, **LORA, **extra, **{"train.init_from": base, "train.max_iters": 3}))
        got = params_of(tr)
        assert all(np.array_equal(got[n], want[n]) for n in want), name
        assert np.any(got["h.1.attn.c_proj.lora_B"] != 0) and all(
            np.isfinite(tr.metrics.train["loss"])
        ), name
        assert tr.opt.m.size == sum(got[n].size for n in got if is_lora(n)), name
        runs[name] = tr
    assert runs["recompute"].metrics.train["loss"] == runs["plain"].metrics.train["loss"]
    assert rel_diff(runs["bf16"].metrics.train["loss"], runs["plain"].metrics.train["loss"]) < 0.05


@pytest.mark.parallel(nprocs=2)
def test_lora_parallel_runs_equal_single_process(data_dir, tmp_path, shared_tmp_path):
    """LoRA at pp2 (1F1B), tp2 and dp2 ZeRO-1 equals the single-process LoRA run (float64, 1e-10: losses, norms,
    evals, every parameter), the base bitwise unchanged everywhere."""
    world = MPI.COMM_WORLD
    common = {
        **LORA,
        "model.dtype": "float64",
        "model.n_layer": 4,
        "train.grad_accum": 2,
        "train.max_iters": 3,
        "train.eval_interval": 3,
    }
    ref = train(run_config(data_dir, tmp_path / "ref", **common), single_process_grid())
    bad = []
    for name, lay, (tp, pp) in (
        ("pp2", {"parallel.pp": 2}, (1, 2)),
        ("tp2", {"parallel.tp": 2}, (2, 1)),
        ("dp2-zero1", {"parallel.zero": 1}, (1, 1)),
    ):
        tr = train(
            run_config(data_dir, shared_tmp_path / name, **common, **lay), make_grid(world, tp, pp)
        )
        bad += reference_checks(tr, ref, name)
        got, init = params_of(tr), initial_params(tr.cfg, tr.plan)
        bad += [
            f"{name}: base {n} changed"
            for n in got
            if not is_lora(n) and not np.array_equal(got[n], init[n])
        ]
        # the frozen tied embedding (first and last stage at pp2): its gradient never computed nor reduced
        if "wte.weight" in tr.model.grads and np.any(tr.model.grads["wte.weight"]):
            bad.append(f"{name}: the frozen wte's gradient buffer was written")
    check(not bad, "\n".join(bad))
