"""AdamW, the learning-rate schedule and gradient clipping against an independent float64 reference written out here.

The reference is the published algorithms, not the code's arrangement of them:

- PyTorch's AdamW (torch.optim.AdamW, amsgrad=False): p *= 1 - lr*wd (decoupled; on 2-D weight tensors only, decided
  here from the tensors' shapes, as nanoGPT does), m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, m_hat = m/(1-b1^t),
  v_hat = v/(1-b2^t), p -= lr * m_hat / (sqrt(v_hat) + eps).
- nanoGPT's schedule: lr*(step+1)/(warmup+1) during warm-up, cosine from lr to min_lr over [warmup, lr_decay_iters],
  min_lr after.
- global-norm clipping: g *= min(1, grad_clip / (||g|| + 1e-6)), the norm of the whole model's gradient.

Tolerance (float64): the code computes the same update rearranged (the clip factor folded into the moments'
coefficients, the bias corrections folded into the step size and eps); each of the ~10 operations per element and step
rounds by half an ulp, so a step's update differs by a few ulps of its size, which is at most a few lr, and the
parameter by a few ulps of itself. Over K <= 6 steps: |p - ref| <= 1e-14 (~45 ulps) * (|ref| + sum of lr); seen:
2.3 ulps of that scale.
A wrong formula (missing bias correction, eps inside the sqrt, decay on LayerNorm or coupled into the gradient, a
wrong beta, a clip factor without its 1e-6) moves some parameter by orders of magnitude more than that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import check, tiny_config
from mpi4py import MPI

from hpc_llm import optim
from hpc_llm.config import TrainConfig
from hpc_llm.optim import AdamW, lr_at
from hpc_llm.parallel.grid import make_grid, single_process_grid
from hpc_llm.train.trainer import Trainer

RTOL = 1e-14  # see the module docstring


# -- the reference ---------------------------------------------------------------------------------------------------


def ref_lr(step: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT's get_lr, written out again."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def ref_clip_factor(grad: np.ndarray, grad_clip: float) -> tuple[float, float]:
    """(||grad||, the factor clipping multiplies the gradient by), in float64."""
    g = np.asarray(grad, dtype=np.float64)
    norm = math.sqrt(float(np.sum(g * g)))
    return norm, (min(1.0, grad_clip / (norm + 1e-6)) if grad_clip > 0 else 1.0)


class ReferenceAdamW:
    """torch.optim.AdamW's algorithm on one float64 vector; `decay` marks the elements that get weight decay."""

    def __init__(
        self, decay: np.ndarray, beta1: float, beta2: float, eps: float, weight_decay: float
    ):
        self.decay = decay
        self.b1, self.b2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.m = np.zeros(decay.size)
        self.v = np.zeros(decay.size)
        self.t = 0

    def step(self, p: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
        """The parameters after one step from p with gradient g (already clipped)."""
        self.t += 1
        p = np.where(self.decay, p * (1.0 - lr * self.wd), p)
        self.m = self.b1 * self.m + (1.0 - self.b1) * g
        self.v = self.b2 * self.v + (1.0 - self.b2) * g * g
        m_hat = self.m / (1.0 - self.b1**self.t)
        v_hat = self.v / (1.0 - self.b2**self.t)
        return p - lr * m_hat / (np.sqrt(v_hat) + self.eps)


def mismatch(got, want, lr_sum: float) -> str:
    """'' if |got - want| <= RTOL * (|want| + lr_sum) everywhere, else a description of the worst element."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    excess = np.abs(got - want) - RTOL * (np.abs(want) + lr_sum)
    if excess.max() <= 0:
        return ""
    i = int(excess.argmax())
    return f"element {i}: {float(got[i])!r} vs reference {float(want[i])!r} ({np.sum(excess > 0)} of {got.size} off)"


# -- the schedule ----------------------------------------------------------------------------------------------------


def test_lr_schedule_at_hand_checked_points():
    """lr 1e-3, min_lr 1e-4, warm-up 4 steps, decay to step 12: warm-up is k/5 of lr at steps k-1 = 0..3, the peak
    at step 4, the cosine's quarter (step 6) is min_lr + (2 + sqrt 2)/4 * 9e-4, its middle (step 8) is (lr + min_lr)/2
    = 5.5e-4, min_lr at step 12 and ever after."""
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=4, lr_decay_iters=12)
    hand = {
        0: 2e-4,
        1: 4e-4,
        2: 6e-4,
        3: 8e-4,
        4: 1e-3,
        6: 1e-4 + (2 + math.sqrt(2)) / 4 * 9e-4,
        8: 5.5e-4,
        12: 1e-4,
        13: 1e-4,
        100: 1e-4,
        10**7: 1e-4,
    }
    for step, want in hand.items():
        assert lr_at(step, t) == pytest.approx(want, rel=1e-15, abs=0), step
    assert hand[6] == pytest.approx(8.681980515339464e-4, rel=1e-15)


@pytest.mark.parametrize(
    "lr, min_lr, warmup, decay",
    [(1e-3, 1e-4, 4, 12), (6e-4, 6e-5, 0, 9), (2e-2, 0.0, 7, 30), (1.0, 1.0, 2, 5)],
)
def test_lr_schedule_matches_reference_everywhere(lr, min_lr, warmup, decay):
    """Every step of a few schedules (no warm-up, min_lr 0, constant) against the reference; warm-up increases, the
    decay never increases, and lr never leaves [0, lr]."""
    t = TrainConfig(lr=lr, min_lr=min_lr, warmup_iters=warmup, lr_decay_iters=decay)
    got = [lr_at(s, t) for s in range(decay + 5)]
    want = [ref_lr(s, lr, min_lr, warmup, decay) for s in range(decay + 5)]
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    assert all(a < b for a, b in zip(got[:warmup], got[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1 :]))
    assert got[warmup] == pytest.approx(lr, rel=1e-15) and got[decay] == pytest.approx(
        min_lr, rel=1e-15
    )
    assert 0 <= min(got) and max(got) <= lr * (1 + 1e-15)


# -- AdamW directly --------------------------------------------------------------------------------------------------

LAYOUT = [  # a miniature model's flat buffer: (name, shape)
    ("wte.weight", (11, 6)),
    ("wpe.weight", (5, 6)),
    ("h.0.ln_1.weight", (6,)),
    ("h.0.ln_1.bias", (6,)),
    ("h.0.mlp.c_fc.weight", (6, 9)),
    ("h.0.mlp.c_fc.bias", (9,)),
    ("h.0.mlp.c_proj.weight", (9, 6)),
    ("ln_f.bias", (6,)),
]
HYPER = dict(beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.1)
LRS = [3e-3, 1e-2, 2e-2, 7e-3, 1e-3, 5e-2]  # one per step
SCALES = [0.37, 1.0, 0.6, 0.05, 1.0, 0.8]  # the clipping factor of each step


def layout_offsets():
    """[(name, shape, start, stop)] of LAYOUT, back to back."""
    out, o = [], 0
    for name, shape in LAYOUT:
        out.append((name, shape, o, o + math.prod(shape)))
        o += math.prod(shape)
    return out


def decay_mask_and_ranges():
    """Weight decay on the 2-D tensors: as a mask, and as the merged [start, stop) ranges AdamW is given."""
    tensors = layout_offsets()
    mask = np.zeros(tensors[-1][3], dtype=bool)
    for _, shape, a, b in tensors:
        mask[a:b] = len(shape) == 2
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return mask, [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def random_steps(n: int, seed: int = 0):
    """Initial parameters and one gradient per step, with magnitudes from 1e-3 to 10 (so eps = 1e-3 matters for
    some elements and not for others), and a whole tensor's gradient 0 in one step (its update is momentum only)."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n) * 0.5
    grads = [rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, size=n) for _ in LRS]
    _, _, a, b = layout_offsets()[4]
    grads[2][a:b] = 0.0
    return p0, grads


def reference_run(p0, grads, mask):
    """The reference's parameters and moments after each step of LRS/SCALES."""
    ref = ReferenceAdamW(mask, **HYPER)
    p, out = p0.copy(), []
    for g, lr, s in zip(grads, LRS, SCALES):
        p = ref.step(p, s * g, lr)
        out.append((p, ref.m.copy(), ref.v.copy()))
    return out


def shards(n: int):
    """Three ZeRO-1-like owners of [0, n): 9 pieces dealt round-robin, so each owner holds 3 separate ranges; the
    cuts fall inside decayed and undecayed tensors and one piece is a single element."""
    cuts = [0, 40, 77, 100, 101, 130, 150, 166, 200, n]
    pieces = list(zip(cuts[:-1], cuts[1:]))
    return [pieces[r::3] for r in range(3)]


def test_shards_cut_where_it_matters():
    """The shard layout above splits a decay range inside a tensor, an undecayed tensor, and has a 1-element piece."""
    mask, ranges = decay_mask_and_ranges()
    assert ranges == [(0, 96), (108, 162), (171, 225)]
    cuts = {a for owner in shards(mask.size) for a, _ in owner} - {0}

    def inside(c):
        return [name for name, _, a, b in layout_offsets() if a < c < b]

    assert (
        inside(40) == ["wte.weight"]
        and inside(77) == ["wpe.weight"]
        and inside(130) == ["h.0.mlp.c_fc.weight"]
    )
    assert (
        inside(100) == ["h.0.ln_1.weight"]
        and inside(166) == ["h.0.mlp.c_fc.bias"]
        and {40, 77, 100, 130} <= cuts
    )
    assert any(b - a == 1 for owner in shards(mask.size) for a, b in owner)


@pytest.mark.parametrize(
    "chunk, threads", [(optim.CHUNK, 1), (8, 1), (8, 3)], ids=["whole", "chunk8", "chunk8-3thr"]
)
@pytest.mark.parametrize("sharded", [False, True], ids=["dense", "zero1"])
def test_adamw_matches_reference(sharded, chunk, threads, monkeypatch):
    """6 steps of AdamW (beta1 0.8, beta2 0.95, eps 1e-3, weight decay 0.1, a varying lr and clip factor) against
    the reference: parameters after every step, and the moments m, v. Dense: one optimizer owns the buffer. Sharded:
    three optimizers, each owning its pieces (shards()) of its own copy of the buffer, as ZeRO-1 ranks do before the
    allgather: the union of their pieces equals the reference, and nothing outside a rank's pieces moves. Also with
    chunks of 8 elements (chunk edges inside tensors) and with 3 threads sharing the chunks."""
    monkeypatch.setattr(optim, "optimizer_threads", lambda: threads)
    mask, ranges = decay_mask_and_ranges()
    n = mask.size
    p0, grads = random_steps(n)
    want = reference_run(p0, grads, mask)
    owners = shards(n) if sharded else [[(0, n)]]
    cfg = TrainConfig(**HYPER)
    ps = [p0.copy() for _ in owners]
    gbuf = np.zeros(n)
    opts = [
        AdamW(p, gbuf, ranges, cfg, owned=owned if sharded else None, chunk=chunk)
        for p, owned in zip(ps, owners)
    ]
    assert all(o.threads == threads for o in opts)
    for k, (g, lr, s) in enumerate(zip(grads, LRS, SCALES)):
        gbuf[...] = g
        for o in opts:
            o.step(lr, grad_scale=s)
        p_ref, m_ref, v_ref = want[k]
        lr_sum = sum(LRS[: k + 1])
        union = np.full(n, np.nan)
        for p, owned in zip(ps, owners):
            for a, b in owned:
                union[a:b] = p[a:b]
            outside = np.ones(n, dtype=bool)
            for a, b in owned:
                outside[a:b] = False
            assert np.array_equal(p[outside], p0[outside]), (
                f"step {k}: an optimizer wrote outside its shard"
            )
        assert not (msg := mismatch(union, p_ref, lr_sum)), f"step {k} parameters: {msg}"
        for slot, ref_moment in (("m", m_ref), ("v", v_ref)):
            got = np.zeros(n)
            for o, owned in zip(opts, owners):
                flat = o.moments_flat(slot, np.empty(n))
                for a, b in owned:
                    got[a:b] = flat[a:b]
            scale = np.abs(ref_moment).max()
            np.testing.assert_allclose(
                got, ref_moment, rtol=RTOL, atol=RTOL * scale, err_msg=f"step {k} {slot}"
            )
    assert [o.t for o in opts] == [len(LRS)] * len(opts)
    # every element moved by far more than the tolerance (slips: test_reference_differs_from_plausible_slips)
    assert np.abs(want[-1][0] - p0).min() > 1e3 * RTOL * (np.abs(p0).max() + sum(LRS))


def test_reference_differs_from_plausible_slips():
    """The reference itself tells the slips apart (each by far more than the tolerance): Adam without bias
    correction, eps inside the sqrt, decay on every tensor, decay coupled into the gradient, (1-b2) -> b2."""
    mask, _ = decay_mask_and_ranges()
    p0, grads = random_steps(mask.size)
    good = reference_run(p0, grads, mask)[-1][0]

    def run(step):
        m = v = np.zeros_like(p0)
        p = p0.copy()
        b1, b2, eps, wd = HYPER["beta1"], HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"]
        for t, (g, lr, s) in enumerate(zip(grads, LRS, SCALES), start=1):
            p, m, v = step(p, s * g, lr, m, v, t, b1, b2, eps, wd)
        return p

    def adam(
        p,
        g,
        lr,
        m,
        v,
        t,
        b1,
        b2,
        eps,
        wd,
        bias=True,
        eps_in=False,
        dmask=mask,
        coupled=False,
        v_coef=None,
    ):
        if coupled:
            g = g + wd * np.where(dmask, p, 0)
        else:
            p = np.where(dmask, p * (1 - lr * wd), p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + ((1 - b2) if v_coef is None else v_coef) * g * g
        mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias else (m, v)
        return p - lr * mh / (np.sqrt(vh + eps) if eps_in else np.sqrt(vh) + eps), m, v

    assert not mismatch(run(adam), good, sum(LRS))
    slips = {
        "no bias correction": dict(bias=False),
        "eps inside sqrt": dict(eps_in=True),
        "decay everywhere": dict(dmask=np.ones_like(mask)),
        "coupled decay": dict(coupled=True),
        "b2 for (1-b2)": dict(v_coef=HYPER["beta2"]),
    }
    for name, kw in slips.items():
        bad = run(lambda *a, kw=kw: adam(*a, **kw))
        assert mismatch(bad, good, 1e3 * sum(LRS)), name


# -- the Trainer end to end ------------------------------------------------------------------------------------------

STEPS = 6
TRAINER_SETTINGS = {
    "model.dtype": "float64",
    "train.max_iters": STEPS,
    "train.eval_iters": 0,
    "train.lr": 1e-2,
    "train.min_lr": 1e-3,
    "train.warmup_iters": 2,
    "train.lr_decay_iters": 5,
    "train.beta1": 0.8,
    "train.beta2": 0.95,
    "train.eps": 1e-4,
    "train.weight_decay": 0.1,
    # the gradient norm is ~2.54 at step 0, ~1.78 at step 1, 1.43-1.57 after: two steps clip
    "train.grad_clip": 1.67,
    "train.grad_accum": 2,
    "parallel.bucket_mb": 0.01,
}


def decay_mask_of(model) -> np.ndarray:
    """Weight decay on the 2-D tensors, from the specs' names and shapes (not from the model's decay flags)."""
    mask = np.zeros(model.local_size, dtype=bool)
    for s in model.specs:
        two_d = len(s.shape) == 2
        assert two_d == (s.name.endswith(".weight") and ".ln_" not in "." + s.name), s.name
        mask[s.offset : s.offset + s.size] = two_d
    return mask


def trainer_vs_reference(tr: Trainer, full_gradient) -> list[str]:
    """Run STEPS steps of `tr`, capturing before every optimizer step the parameters and (full_gradient(tr)) the
    whole model's reduced gradient; after each step, tr's parameters must equal the reference step from those, with
    the reference lr and clip factor. Returns the problems found (empty: none)."""
    t = tr.cfg.train
    ref = ReferenceAdamW(decay_mask_of(tr.model), t.beta1, t.beta2, t.eps, t.weight_decay)
    seen = []
    opt_step = tr.opt.step

    def spy(lr, grad_scale=1.0):
        seen.append((tr.model.flat.copy(), full_gradient(tr)))
        opt_step(lr, grad_scale)

    tr.opt.step = spy
    bad, clipped, lr_sum = [], [], 0.0
    for k in range(STEPS):
        _, norm, lr = tr.train_step()
        p_before, g = seen[-1]
        ref_norm, scale = ref_clip_factor(g, t.grad_clip)
        lr_k = ref_lr(k, t.lr, t.min_lr, t.warmup_iters, t.lr_decay_iters)
        lr_sum += lr_k
        clipped.append(scale < 1)
        if not (
            math.isclose(norm, ref_norm, rel_tol=1e-12) and math.isclose(lr, lr_k, rel_tol=1e-15)
        ):
            bad.append(f"step {k}: grad norm {norm!r}, lr {lr!r}; reference {ref_norm!r}, {lr_k!r}")
        want = ref.step(p_before, scale * g, lr_k)
        if msg := mismatch(tr.model.flat, want, lr_sum):
            bad.append(f"step {k} parameters: {msg}")
        if not np.abs(want - p_before).max() > 0.1 * lr_k:
            bad.append(f"step {k}: the reference hardly moved the parameters")
    if len(seen) != STEPS or not (any(clipped) and not all(clipped)):
        bad.append(
            f"{len(seen)} optimizer steps; clipped {clipped}: expected some steps clipped and some not"
        )
    return bad


def test_trainer_matches_reference(make_cfg):
    """One process, float64, gradient accumulation 2: every step's parameters against the reference AdamW applied to
    the captured parameters and gradient, with the reference schedule and clip factor (some steps clipped)."""
    tr = Trainer(make_cfg(**TRAINER_SETTINGS), grid=single_process_grid())
    assert tr.opt.owned == [(0, tr.model.local_size)]
    bad = trainer_vs_reference(tr, lambda tr: tr.model.grad_flat.copy())
    assert not bad, "\n".join(bad)


def gathered_gradient(tr: Trainer) -> np.ndarray:
    """The whole reduced gradient from the ranks' owned ranges (after GradientSync.finish only those are valid on a
    rank); the owned ranges must partition the buffer."""
    g = tr.model.grad_flat
    full = np.zeros_like(g)
    count = np.zeros(g.size, dtype=int)
    for pieces in MPI.COMM_WORLD.allgather([(a, b, g[a:b].copy()) for a, b in tr.sync.owned]):
        for a, b, x in pieces:
            full[a:b] = x
            count[a:b] += 1
    assert (count == 1).all(), "the ZeRO-1 shards do not partition the buffer"
    return full


@pytest.mark.parallel(nprocs=2)
def test_trainer_zero1_dp2_matches_reference(data_dir, shared_tmp_path):
    """DP2 with ZeRO-1 (a rank updates only its shards, then the allgather): every step's allgathered parameters
    against the reference step of the whole buffer from the captured parameters and the gradient gathered from the
    ranks' shards; the shards cut through decayed tensors."""
    tr = Trainer(
        tiny_config(data_dir, shared_tmp_path / "run", **TRAINER_SETTINGS, **{"parallel.zero": 1}),
        grid=make_grid(MPI.COMM_WORLD, 1),
    )
    mask = decay_mask_of(tr.model)
    edges = {e for r in tr.sync.owned for e in r} - {0, tr.model.local_size}
    # on every rank before the collectives below
    check(
        tr.sync.zero and tr.grid.dp == 2 and any(mask[e - 1] and mask[e] for e in edges),
        f"zero {tr.sync.zero}, dp {tr.grid.dp}, shards {tr.sync.owned[:4]}...: not a ZeRO-1 layout cutting "
        f"decayed tensors",
    )
    bad = trainer_vs_reference(tr, gathered_gradient)
    check(not bad, "\n".join(bad))


class _RankComm:
    """What GradientSync asks of its group: size and rank (ownership is computed, nothing communicated)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


@pytest.mark.parametrize(
    "n, dp, bucket", [(2621, 2, 2621), (1000, 3, 77), (10, 4, 3), (7919, 4, 1000)]
)
def test_zero1_shards_tile_the_buffer(n, dp, bucket):
    """ZeRO-1's owned pieces: over the dp ranks they tile [0, n) exactly (no overlap, no gap), and rank r's piece of
    every bucket is counts[r] long, also where the bucket does not divide evenly (an odd float32 bucket, dp 3)."""
    from hpc_llm.parallel.data_parallel import GradientSync

    grads = np.zeros(n)
    syncs = [GradientSync(grads, _RankComm(r, dp), bucket, zero=True) for r in range(dp)]
    pieces = sorted(p for s in syncs for p in s.owned)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), pieces
    for r, s in enumerate(syncs):
        lengths = sorted(b - a for a, b in s.owned)
        assert lengths == sorted(c[r] for c in s.counts if c[r] > 0)
        assert sum(lengths) == sum(c[r] for c in s.counts)


# -- fp16: the step on the unscaled gradients ------------------------------------------------------------------------

U32 = 2.0**-24


def fp32_step_bound(p, m, v, g, keep, c: dict) -> np.ndarray:
    """How far the code's float32 step may lie from the exact step from the same (p, m, v, g), entry by entry.

    Each coefficient is rounded to float32 where it meets the arrays (u = 2^-24 relative), each operation rounds
    once (u). p keep: 2 roundings. m' = b1 m + g1 g: 3 on each term (their sum may cancel: bounded by the terms'
    magnitudes, not by |m'|). v' = b2 v + g2 g^2: 4 on a sum of positive terms; its sqrt halves that and adds 1; eps
    rounded and added: the denominator d within 5u. The update U = step m'/d: m''s error over d, plus 5u (d) and 3u
    (step rounded, the product, the quotient) of |U|; the subtraction from p rounds once more. First order; the
    factor 2 covers the u^2 terms many times over."""
    b1m, g1g = np.abs(c["b1"] * m), np.abs(c["g1"] * g)
    d = np.sqrt(c["b2"] * v + c["g2"] * g * g) + c["eps"]
    update = c["step"] * np.abs(c["b1"] * m + c["g1"] * g) / d
    err_update = c["step"] * 3 * U32 * (b1m + g1g) / d + 8 * U32 * update
    return 2 * (2 * U32 * np.abs(p * keep) + err_update + U32 * (np.abs(p * keep) + update))


def test_fp16_step_equals_float64_on_the_unscaled_gradients(make_cfg):
    """fp16 (loss scale 2^10, growing every 2 clean steps): each optimizer step of the float32 master weights equals,
    entry by entry within fp32_step_bound, the float64 AdamW step from the same parameters and moments on the
    gradient divided by the loss scale the step's backward ran with, clipped by the norm of that unscaled gradient.
    eps (1e-3) is of the order of the gradients' entries and the clipping threshold below their norm, so a step that
    forgot to unscale (the gradients 2^10 times larger: m / (sqrt(v) + eps) then ~ sign(g)) or clipped by the scaled
    norm lands far outside the bound (checked against the same reference)."""
    tr = Trainer(
        make_cfg(
            **{
                "train.precision": "fp16",
                "train.loss_scale_init": 2.0**10,
                "train.loss_scale_window": 2,
                "train.eps": 1e-3,
                "train.grad_clip": 0.5,
                "train.weight_decay": 0.1,
                "train.grad_accum": 2,
            }
        ),
        grid=single_process_grid(),
    )
    t = tr.cfg.train
    decay = decay_mask_of(tr.model)
    seen = []
    opt_step = tr.opt.step

    def spy(lr, grad_scale=1.0):
        o = tr.opt
        seen.append([tr.model.flat.copy(), tr.model.grad_flat.copy(), o.m.copy(), o.v.copy(), lr])
        opt_step(lr, grad_scale)

    tr.opt.step = spy
    bad, scales, clipped = [], [], []
    for _ in range(5):
        scale = tr.scaler.scale
        tr.train_step()
        scales.append(scale)
        p, g, m, v = (np.asarray(a, dtype=np.float64) for a in seen[-1][:4])
        lr = seen[-1][4]
        g = g / scale  # exact: a power of two
        norm, clip = ref_clip_factor(g, t.grad_clip)
        clipped.append(clip < 1)
        k = tr.opt.t
        bc1, bc2 = 1 - t.beta1**k, 1 - t.beta2**k
        keep = np.where(decay, 1 - lr * t.weight_decay, 1.0)

        def reference(grad):
            m2 = t.beta1 * m + (1 - t.beta1) * grad
            v2 = t.beta2 * v + (1 - t.beta2) * grad * grad
            return p * keep - lr * (m2 / bc1) / (np.sqrt(v2 / bc2) + t.eps)

        want = reference(clip * g)
        coef = {
            "b1": t.beta1,
            "b2": t.beta2,
            "g1": (1 - t.beta1) * clip,
            "g2": (1 - t.beta2) * clip * clip,
            "eps": t.eps * math.sqrt(bc2),
            "step": lr * math.sqrt(bc2) / bc1,
        }
        bound = fp32_step_bound(p, m, v, g, keep, coef)
        err = np.abs(tr.model.flat - want)
        if not np.all(err <= bound):
            i = int(np.argmax(err / bound))
            bad.append(f"step {k}: entry {i} off by {err[i]:.3e}, bound {bound[i]:.3e}")
        # the slips this test is for: no unscale; clipping by the scaled norm
        for name, slip in (
            ("not unscaled", reference(clip * g * scale)),
            (
                "clipped by the scaled norm",
                reference(ref_clip_factor(g * scale, t.grad_clip)[1] * g),
            ),
        ):
            if not np.sum(np.abs(slip - want) > 100 * bound) > want.size // 10:
                bad.append(f"step {k}: the slip '{name}' would stay within the bound")
    if len(seen) != 5 or len(set(scales)) < 2 or not any(clipped):
        bad.append(f"{len(seen)} steps taken, loss scales {scales}, clipped {clipped}")
    assert not bad, "\n".join(bad)
