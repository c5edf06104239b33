"""Pipeline schedules: every op list's shape derived from its rule, and its timing by the discrete-event simulator
(bubble formulas, no deadlock; a broken list deadlocks and raises); the send depth PipelineComm keeps (send_depth:
no deadlock, no longer step, over every schedule at p <= 8, v <= 4). ZB-H1's lists against its rule (1F1B's F and B,
each stage's deferred W's) and its bubble, (p - 1)(t_f + t_b - t_w) where t_w <= t_f, t_b. ZBV's lists against its
phases (warm-up, steady triples, cool-down with deferred W's), its V placement, its in-flight bound (2p chunks: p
stages' activations, 1F1B's) and its step at equal costs (only the V's fill: (p - 1) t_f / 2 above the work)."""

import random

import pytest

from hpc_llm.parallel.schedule import (
    V_SHAPED,
    Op,
    Phase,
    describe,
    gpipe,
    in_flight,
    interleaved,
    one_f_one_b,
    schedule,
    stage_chunk,
    stage_rank,
    virtual_stage,
    zb_h1,
    zbv,
)
from hpc_llm.parallel.schedule_timing import send_depth, simulate, simulate_lists

PS, MS, VS = range(1, 7), range(1, 13), (2, 3)


def cases():
    """Every (name, p, m, v) the tests sweep: interleaved only where m is a multiple of p."""
    for p in PS:
        for m in MS:
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            yield "zb-h1", p, m, 1
            yield "zbv", p, m, 2
            if m % p == 0:
                for v in VS:
                    yield "interleaved", p, m, v


CASES = list(cases())


def interleaved_warmup(p, s, m, v):
    return min((p - s - 1) * 2 + (v - 1) * p, m * v)


def check_warmup_1f1b_shape(ops, warmup):
    """`warmup` F's, then strictly alternating F, B, then only B's (as many as the warm-up)."""
    kinds = "".join(op.kind for op in ops)
    n = len(ops) // 2
    assert kinds == "F" * warmup + "FB" * (n - warmup) + "B" * warmup


# ---------------------------------------------------------------------------------------------------- op lists


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1", "zbv"])
def test_every_op_once_forward_before_backward(name):
    """Each (micro-batch, chunk) once forward, once backward after it; with W ops (zb-h1, zbv) once W after its B."""
    F, B, W = Phase.FORWARD, Phase.BACKWARD, Phase.WEIGHT
    for _, p, m, v in (c for c in CASES if c[0] == name):
        for s in range(p):
            ops = schedule(name, p, s, m, v)
            kinds = (F, B, W) if name in ("zb-h1", "zbv") else (F, B)
            want = {(i, c) for i in range(m) for c in range(v)}
            where = {op: k for k, op in enumerate(ops)}
            assert len(ops) == len(kinds) * m * v and len(where) == len(ops)  # no duplicates
            for kind in kinds:
                assert {(op.micro, op.chunk) for op in ops if op.kind == kind} == want
            for a, b in zip(kinds, kinds[1:]):
                assert all(where[Op(a, i, c)] < where[Op(b, i, c)] for i, c in want), (p, s, m)


def test_one_f_one_b_shape_and_in_flight():
    for p in PS:
        for m in MS:
            for s in range(p):
                ops = one_f_one_b(p, s, m)
                check_warmup_1f1b_shape(ops, min(p - s - 1, m))
                assert [op.micro for op in ops if op.kind == Phase.FORWARD] == list(range(m))
                assert in_flight(ops) == min(p - s, m)


def test_gpipe_shape_and_in_flight():
    for p in PS:
        for m in MS:
            for s in range(p):
                ops = gpipe(p, s, m)
                assert ops == [Op(Phase.FORWARD, i) for i in range(m)] + [
                    Op(Phase.BACKWARD, i) for i in range(m)
                ]
                assert in_flight(ops) == m


def test_interleaved_order_and_in_flight():
    for _, p, m, v in (c for c in CASES if c[0] == "interleaved"):
        # groups of p micro-batches through chunk 0, 1, ..., v - 1 (forward) or v - 1, ..., 0 (backward)
        def order(chunks):
            return [(g + j, c) for g in range(0, m, p) for c in chunks for j in range(p)]

        for s in range(p):
            ops = interleaved(p, s, m, v)
            warmup = interleaved_warmup(p, s, m, v)
            check_warmup_1f1b_shape(ops, warmup)
            assert [(op.micro, op.chunk) for op in ops if op.kind == Phase.FORWARD] == order(
                range(v)
            )
            assert [(op.micro, op.chunk) for op in ops if op.kind == Phase.BACKWARD] == order(
                range(v - 1, -1, -1)
            )
            # steady state: each F adds one to the warm-up's stored activations before its B frees one
            assert in_flight(ops) == min(warmup + 1, m * v)


def test_backwards_in_micro_batch_order_per_chunk():
    """Each chunk's gradients accumulate micro-batches 0, 1, ... in every schedule (by its W ops where it has them):
    bitwise-equal results."""
    for name, p, m, v in CASES:
        for s in range(p):
            ops = schedule(name, p, s, m, v)
            for c in range(v):
                for kind in (Phase.BACKWARD, Phase.WEIGHT):
                    micros = [op.micro for op in ops if op.kind == kind and op.chunk == c]
                    assert micros == list(range(m)) or (kind == Phase.WEIGHT and not micros)


def test_zb_h1_shape_and_in_flight():
    """ZB-H1 on stage s: the F and B ops are 1F1B's in 1F1B's order (its warm-up of p - s - 1 forwards); the W of the
    first min(s, m) backwards is deferred, every later B is followed at once by the oldest W not yet run, and the
    deferred W's close the list; an activation lives from its F to its W, min(p, m) at most, on every stage."""
    for p in PS:
        for m in MS:
            for s in range(p):
                ops = zb_h1(p, s, m)
                assert [op for op in ops if op.kind != Phase.WEIGHT] == one_f_one_b(p, s, m)
                deferred = min(s, m)
                for k, op in enumerate(ops):
                    if op.kind == Phase.BACKWARD and op.micro >= deferred:
                        assert ops[k + 1] == Op(Phase.WEIGHT, op.micro - deferred), (p, s, m, k)
                tail = [Op(Phase.WEIGHT, i) for i in range(m - deferred, m)]
                assert ops[len(ops) - deferred :] == tail, (p, s, m)
                assert in_flight(ops) == min(p, m), (p, s, m)


def test_zbv_placement_is_a_v():
    """Rank r holds virtual stages r and 2p - 1 - r: the first p stages down the ranks, the next p back up; rank 0
    both ends, rank p - 1 the turn (stages p - 1 and p); stage_rank and stage_chunk invert virtual_stage."""
    for p in PS:
        down = [virtual_stage(p, r, 0, True) for r in range(p)]
        up = [virtual_stage(p, r, 1, True) for r in range(p)]
        assert down == list(range(p)) and up == list(range(2 * p - 1, p - 1, -1))
        for r in range(p):
            for c in (0, 1):
                s = virtual_stage(p, r, c, True)
                assert (stage_rank(p, s, True), stage_chunk(p, s, True)) == (r, c)
                assert stage_rank(p, virtual_stage(p, r, c), False) == r  # looped: c p + r


def test_zbv_shape_and_in_flight():
    """ZBV on stage s, m >= 2p - 1 (F0: chunk 0's forward, ...): the warm-up is 2(p - s) - 1 F0, s pairs (F1, F0),
    then p - s triples (F1, B1, W1); the steady state triples B0 W0 and F1 B1 W1, each after an F0 while forwards
    remain; the cool-down s pairs (B0, B1) with their W's deferred, p - s pairs (B0, oldest W0), then the deferred
    W1's and W0's. Each B is followed at once by its own W outside the cool-down. 2p chunks are in flight on every
    stage (p stages' worth of activations, 1F1B's stage 0); with fewer micro-batches the pattern's ops of
    micro-batches >= m are dropped and at most 2m are in flight."""
    F, B, W = Phase.FORWARD, Phase.BACKWARD, Phase.WEIGHT
    for p in PS:
        for m in MS:
            for s in range(p):
                ops = zbv(p, s, m)
                if m < 2 * p - 1:
                    assert in_flight(ops) <= min(2 * p, 2 * m), (p, s, m)
                    continue
                assert in_flight(ops) == 2 * p, (p, s, m)
                text = " ".join(f"{op.kind}{op.chunk}" for op in ops)
                warm = ["F0"] * (2 * (p - s) - 1) + ["F1 F0"] * s + ["F1 B1 W1"] * (p - s)
                steady = ["F0 B0 W0 F1 B1 W1"] * (m - 2 * p + 1 + s) + ["B0 W0 F1 B1 W1"] * (
                    p - s - 1
                )
                cool = ["B0 B1"] * s + ["B0 W0"] * (p - s) + ["W1"] * s + ["W0"] * s
                assert text == " ".join(warm + steady + cool), (p, s, m)
                # outside the cool-down every B is followed by its own W
                cut = len(ops) - 2 * s - 2 * (p - s) - 2 * s
                for k, op in enumerate(ops[:cut]):
                    if op.kind == B:
                        assert ops[k + 1] == Op(W, op.micro, op.chunk), (p, s, m, k)
                for kind in (F, B, W):
                    for c in (0, 1):
                        assert [o.micro for o in ops if o.kind == kind and o.chunk == c] == list(
                            range(m)
                        )


@pytest.mark.parametrize(
    "t_f, t_b, t_w", [(1, 1.2, 0.8), (2, 1, 0.5), (1, 3, 0), (1, 1, 2), (0.5, 2, 1)]
)
def test_zbv_step(t_f, t_b, t_w):
    """With m >= 2p - 1: at equal costs the step is the work, m (t_f + t_b + t_w), plus only the V's fill, the
    p - 1 chunk forwards (t_f / 2 each) before the turn's rank starts: the least any schedule can do with chunks
    of half a stage. At other costs never longer than ZB-H1's, itself never longer than 1F1B's."""
    for p in PS:
        for m in range(2 * p - 1, MS[-1] + 1):
            t = simulate("zbv", p, m, 2, t_f=1.0, t_b=1.0, t_w=1.0)
            assert t.makespan == pytest.approx(3.0 * m + (p - 1) / 2), (p, m)
            assert t.busy == pytest.approx([3.0 * m] * p)
            zb, h1 = (
                simulate(n, p, m, v, t_f=t_f, t_b=t_b, t_w=t_w)
                for n, v in (("zbv", 2), ("zb-h1", 1))
            )
            assert zb.busy == pytest.approx([m * (t_f + t_b + t_w)] * p)
            assert zb.makespan <= h1.makespan + 1e-9, (p, m)


def test_describe_lists_each_rank():
    text = describe("1f1b", 3, 4)
    lines = text.splitlines()
    assert len(lines) == 3
    for s, line in enumerate(lines):
        head, ops = line.split(": ")
        assert head == f"stage {s}"
        assert ops.split() == [f"{op.kind}{op.micro}" for op in one_f_one_b(3, s, 4)]
    first = describe("interleaved", 2, 2, 2).splitlines()[0].split(": ")[1].split()
    assert first[:4] == ["F0.0", "F1.0", "F0.1", "F1.1"]


# ---------------------------------------------------------------------------------------------------- simulation


def test_simulate_never_deadlocks_and_every_rank_does_all_its_work():
    for name, p, m, v in CASES:
        t = simulate(name, p, m, v, t_f=1.0, t_b=1.5, t_w=0.5)
        assert t.busy == pytest.approx([m * 3.0] * p)
        assert t.idle == pytest.approx([t.makespan - b for b in t.busy])
        assert min(t.idle) >= -1e-9


@pytest.mark.parametrize("t_b", [2.0, 1.0, 3.0])
def test_gpipe_and_1f1b_makespan(t_b):
    """Fill p - 1 forwards, m forwards and backwards, drain p - 1 backwards: (m + p - 1) (t_f + t_b), exactly."""
    for p in PS:
        for m in MS:
            want = (m + p - 1) * (1.0 + t_b)
            for name in ("gpipe", "1f1b"):
                t = simulate(name, p, m, t_f=1.0, t_b=t_b)
                assert t.makespan == want, (name, p, m)
                assert t.bubble == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(
    "t_f, t_b, t_w", [(1, 1, 1), (1, 1.2, 0.8), (2, 1, 0.5), (1, 3, 0), (1, 1, 2), (0.5, 2, 1)]
)
def test_zb_h1_bubble(t_f, t_b, t_w):
    """Each stage idles (p - 1)(t_f + t_b - t_w) (Qi et al.'s ZB-H1, for t_w <= t_f, t_b; a longer W fills only
    the shorter of F and B: (p - 1)(t_f + t_b - min(t_f, t_b, t_w))), where 1F1B, whose backward is B and W at
    once, idles (p - 1)(t_f + t_b + t_w); every stage computes m (t_f + t_b + t_w)."""
    for p in PS:
        for m in range(p, MS[-1] + 1):
            zb, base = (simulate(n, p, m, t_f=t_f, t_b=t_b, t_w=t_w) for n in ("zb-h1", "1f1b"))
            assert zb.busy == pytest.approx([m * (t_f + t_b + t_w)] * p)
            filled = min(t_f, t_b, t_w)
            assert zb.idle == pytest.approx([(p - 1) * (t_f + t_b - filled)] * p), (p, m)
            assert base.idle == pytest.approx([(p - 1) * (t_f + t_b + t_w)] * p), (p, m)


@pytest.mark.parametrize("t_b", [2.0, 1.0, 3.0])
def test_interleaved_makespan(t_b):
    """A stage is a chunk (t_f / v, t_b / v): the fill and drain shrink by v, (m + (p - 1) / v) (t_f + t_b)."""
    for _, p, m, v in (c for c in CASES if c[0] == "interleaved"):
        t = simulate("interleaved", p, m, v, t_f=1.0, t_b=t_b)
        assert t.makespan == pytest.approx((m + (p - 1) / v) * (1.0 + t_b), rel=1e-12), (p, m, v)
        assert t.bubble == pytest.approx((p - 1) / (v * m + p - 1))
        if p >= 2:
            assert t.makespan < simulate("1f1b", p, m, t_f=1.0, t_b=t_b).makespan


def test_communication_time():
    """GPipe's only exposed transfers are the 2 (p - 1) hops of the first forward and the last backward; no schedule
    can hide those."""
    c = 0.25
    for name, p, m, v in CASES:
        t, t0 = simulate(name, p, m, v, t_comm=c), simulate(name, p, m, v)
        if name == "gpipe":
            assert t.makespan == t0.makespan + 2 * (p - 1) * c
        assert t.makespan >= t0.makespan + 2 * (p - 1) * c - 1e-9


def test_1f1b_warmup_is_the_least_that_keeps_the_pipeline_full():
    """Stage s + 1 forwards p - s - 1 micro-batches before its first backward, all from stage s, and stage s sends
    w + 1 forwards before it waits for its first backward. Megatron's w = p - s - 1 leaves a spare one in flight,
    so the gradient round trip is hidden; w = p - s - 2 is just enough to go on (slower); w = p - s - 3 is a cycle of
    waits: a deadlock."""
    for p in range(2, 6):
        m = 2 * p
        best = (m + p - 1) * 3.0
        fwd, bwd = (
            [Op(Phase.FORWARD, i) for i in range(m)],
            [Op(Phase.BACKWARD, i) for i in range(m)],
        )
        for s in range(p - 1):
            for w in (p - s - 2, p - s - 3):
                if w < 0:
                    continue
                lists = [one_f_one_b(p, r, m) for r in range(p)]
                lists[s] = fwd[:w] + [x for pair in zip(fwd[w:], bwd) for x in pair] + bwd[m - w :]
                if w == p - s - 2:
                    assert simulate_lists(lists).makespan > best
                else:
                    with pytest.raises(
                        RuntimeError, match=f"deadlock.*stage {s} at Op\\(kind='B', micro=0"
                    ):
                        simulate_lists(lists)


def test_backward_before_own_forward_deadlocks():
    lists = [
        one_f_one_b(2, 0, 2),
        [Op(Phase.BACKWARD, 0), Op(Phase.FORWARD, 0), Op(Phase.FORWARD, 1), Op(Phase.BACKWARD, 1)],
    ]
    with pytest.raises(RuntimeError, match=r"stage 1 at Op\(kind='B', micro=0"):
        simulate_lists(lists)


# ---------------------------------------------------------------------------------------------------- send depth


def depth_cases():
    """Every (name, p, m, v) of the send-depth grid: p up to 8, v up to 4, m up to 4 p (multiples of p interleaved)."""
    for p in range(1, 9):
        for m in range(1, 4 * p + 1):
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            yield "zb-h1", p, m, 1
            yield "zbv", p, m, 2
            if m % p == 0:
                for v in (2, 3, 4):
                    yield "interleaved", p, m, v


def test_send_depth_never_deadlocks_nor_lengthens_the_step():
    """Over the grid, with rendezvous sends (the worst case) and t_f = 1, t_b = 2: the depth send_depth gives runs
    to the end with the makespan of unbounded sends, and it is 1 everywhere (docs/performance.md's table): a rank
    posts the receive of its next op before it waits for its oldest send, so its neighbour's message is never held
    up by that wait for longer than one op."""
    depths = {}
    for name, p, m, v in depth_cases():
        lists = [schedule(name, p, s, m, v) for s in range(p)]
        d = send_depth(name, p, m, v)
        vee = name in V_SHAPED
        free = simulate_lists(lists, v, v_shape=vee)
        bounded = simulate_lists(lists, v, depth=d, v_shape=vee)
        # the V's sends of one direction go to both neighbours, in one window: deeper
        if vee:
            assert d <= max(1, p - 1), (p, m, d)
        assert bounded.makespan == pytest.approx(free.makespan, rel=1e-12, abs=0), (
            name,
            p,
            m,
            v,
            d,
        )
        assert bounded.busy == pytest.approx(free.busy)
        if not vee:
            depths.setdefault(d, []).append((name, p, m, v))
    assert set(depths) == {1}, {d: cases[:5] for d, cases in depths.items()}


def test_send_depth_never_deadlocks_at_other_costs():
    """Deadlock-freedom does not depend on the op costs (each depth wait is a fixed "op X ends before op Y
    starts"): random costs per op (last stage twice as slow) and transfer times still run to the end at
    send_depth's depth (1 but for zbv), never faster than unbounded sends."""
    rng = random.Random(0)
    cases = list(depth_cases())
    for _ in range(200):
        name, p, m, v = rng.choice(cases)
        costs = {}

        def cost(r, op, later):
            base = (1.0 if op.kind == Phase.FORWARD else 2.0) * (2 if r == p - 1 else 1) / v
            return costs.setdefault((r, op), base * rng.uniform(0.5, 1.5))

        lists = [schedule(name, p, s, m, v) for s in range(p)]
        t_comm = rng.choice([0.0, 0.1, 1.0])
        vee, d = name in V_SHAPED, send_depth(name, p, m, v)
        free = simulate_lists(lists, v, t_comm=t_comm, cost=cost, v_shape=vee).makespan
        bounded = simulate_lists(lists, v, t_comm=t_comm, cost=cost, depth=d, v_shape=vee).makespan
        assert bounded >= free - 1e-9, (name, p, m, v)


def test_the_depth_model_waits_and_can_deadlock():
    """Depth 0 (every send completed before the next op) deadlocks every interleaved schedule of the grid with
    p > 1 and m >= 2p, slows those with m = p > 2, and keeps GPipe and 1F1B at uniform costs (lock step): the model's
    waits bite, and depth 1 is the least that is free for all."""
    for name, p, m, v in depth_cases():
        if (
            name in V_SHAPED
        ):  # deeper than 1: test_send_depth_never_deadlocks_nor_lengthens_the_step
            continue
        lists = [schedule(name, p, s, m, v) for s in range(p)]
        free = simulate_lists(lists, v).makespan
        if name == "interleaved" and p > 1 and m >= 2 * p:
            with pytest.raises(RuntimeError, match="deadlocks"):
                simulate_lists(lists, v, depth=0)
        elif name == "interleaved" and p > 2:
            assert simulate_lists(lists, v, depth=0).makespan > free
        else:
            assert simulate_lists(lists, v, depth=0).makespan == pytest.approx(free, rel=1e-12)


def test_a_message_consumed_out_of_send_order_needs_a_deeper_window():
    """Stage 1 takes F2 before F0 and F1: stage 0, holding F0 and F1 undelivered (F0's receive is posted only after
    stage 1's F2), cannot start F2 at depth 1: a cycle of waits, which the simulator reports; depth 2 runs, as do
    unbounded sends. (The built-in schedules never consume out of order: the next test.)"""
    F, B = Phase.FORWARD, Phase.BACKWARD
    lists = [
        gpipe(2, 0, 3),
        [Op(F, 2), Op(F, 0), Op(F, 1), Op(B, 0), Op(B, 1), Op(B, 2)],
    ]
    with pytest.raises(RuntimeError, match=r"deadlocks.*stage 0 at Op\(kind='F', micro=2"):
        simulate_lists(lists, depth=1)
    assert simulate_lists(lists, depth=2).makespan == simulate_lists(lists).makespan


def test_built_in_schedules_consume_each_neighbours_messages_in_send_order():
    """Why depth 1 is enough: in every schedule here (interleaved ones included: a chunk's micro-batches and the
    chunks follow one order on every rank), a rank consumes the messages a neighbour sends it in one direction in
    the order they were sent."""
    for name, p, m, v in depth_cases():
        lists = [schedule(name, p, s, m, v) for s in range(p)]
        where = [{op: k for k, op in enumerate(ops)} for ops in lists]
        last, vee = v * p - 1, name in V_SHAPED
        for r, ops in enumerate(lists):
            for step, kind in ((1, Phase.FORWARD), (-1, Phase.BACKWARD)):
                sent: dict[int, list[Op]] = {}  # per receiving rank, in send order
                for op in ops:
                    to = virtual_stage(p, r, op.chunk, vee) + step
                    if op.kind == kind and 0 <= to <= last and stage_rank(p, to, vee) != r:
                        consumer = Op(kind, op.micro, stage_chunk(p, to, vee))
                        sent.setdefault(stage_rank(p, to, vee), []).append(consumer)
                for dest, msgs in sent.items():
                    consumed = [where[dest][op] for op in msgs]
                    assert consumed == sorted(consumed), (name, p, m, v, r, kind)


def test_send_depth_of_one_rank_and_bad_arguments():
    assert send_depth("1f1b", 1, 4) == 1  # no messages: the bound never binds
    with pytest.raises(ValueError, match="^m"):
        send_depth("interleaved", 4, 6, 2)


# ---------------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: schedule("zb", 2, 0, 4), "name"),
        (lambda: schedule("1f1b", 0, 0, 4), "p"),
        (lambda: schedule("1f1b", 2, 2, 4), "stage"),
        (lambda: schedule("gpipe", 2, -1, 4), "stage"),
        (lambda: schedule("1f1b", 2, 0, 0), "m"),
        (lambda: schedule("1f1b", 2, 0, 4, v=2), "v"),
        (lambda: schedule("zb-h1", 2, 0, 4, v=2), "v"),
        (lambda: schedule("zbv", 2, 0, 4), "v"),
        (lambda: schedule("interleaved", 2, 0, 4, v=0), "v"),
        (lambda: interleaved(4, 0, 6, 2), "m"),
        (lambda: one_f_one_b(2.0, 0, 4), "p"),
        (lambda: simulate("1f1b", 0, 4), "p"),
        (lambda: simulate("1f1b", 2, 4, t_comm=-1.0), "t_comm"),
        (lambda: simulate("gpipe", 2, 4, t_b="2"), "t_b"),
        (lambda: simulate("zb-h1", 2, 4, t_w=-0.5), "t_w"),
    ],
)
def test_bad_arguments_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()
