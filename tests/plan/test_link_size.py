"""A link's bandwidth by message size (link.*.bw_by_size, nb_bw_by_size): the interpolation, files without the tables
priced as before, and small messages made slower reaching the layouts that send them."""

from __future__ import annotations

import math

import pytest
from helpers import plan_cluster_dict

from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.plan import cluster as K
from hpc_llm.plan import cluster_file as KF
from hpc_llm.plan.memory import Layout
from hpc_llm.plan.predict import predict

BASE = (
    plan_cluster_dict()
)  # the planner tests' cluster: 4 devices a node, intra 5 GB/s, inter 1 GB/s


def cluster(**intra) -> K.Cluster:
    d = {**BASE, "link": {**BASE["link"], "intra": {**BASE["link"]["intra"], **intra}}}
    return KF.cluster_from_dict(d)


def test_bandwidth_interpolates_in_log_size_and_clamps():
    link = K.Link(1e-6, 9e9, 8e9, 1.0, ((65536.0, 1e6), (16777216.0, 4e6)), ((65536.0, 2e6),))
    assert link.bw_at(65536) == 1e6 and link.bw_at(16777216) == 4e6  # exact at the points
    assert link.bw_at(1048576) == pytest.approx(1e6 + 0.5 * 3e6)  # halfway in log(size)
    assert link.bw_at(8) == 1e6 and link.bw_at(1 << 30) == 4e6  # clamped at the ends
    assert link.nb_bw_at(1) == link.nb_bw_at(1 << 30) == 2e6  # a one-point table: that rate
    plain = K.Link(1e-6, 9e9, 8e9)
    assert plain.bw_at(65536) == 9e9 and plain.nb_bw_at(65536) == 8e9
    slow = link.slowed(2.0)
    assert slow.bw_at(1048576) == pytest.approx(1.25e6) and slow.nb_bw_at(1) == 1e6
    assert slow.latency_s == 2e-6 and slow.bw == 4.5e9


def test_tables_read_from_the_file_and_written_back(tmp_path):
    table = {"65536": 1e8, "16777216": 4e9}
    cl = cluster(bw_by_size=table)
    link = cl.link("intra")
    # without nb_bw the nonblocking table defaults to the blocking one, as nb_bw to bw
    assert link.bw_by_size == link.nb_bw_by_size == ((65536.0, 1e8), (16777216.0, 4e9))
    # with a scalar nb_bw and no table of its own, nb_bw at every size
    assert cluster(bw_by_size=table, nb_bw=3e9).link("intra").nb_bw_at(65536) == 3e9
    path = tmp_path / "c.toml"
    d = {**BASE, "link": {"intra": {**BASE["link"]["intra"], "nb_bw_by_size": table}}}
    path.write_text(KF.to_toml(d))
    back = KF.load_cluster(path).link("intra")
    assert back.nb_bw_by_size == link.bw_by_size and back.bw_by_size == ()
    assert 'nb_bw_by_size = { "65536" = 1e+08, "16777216" = 4e+09 }' in path.read_text()


@pytest.mark.parametrize(
    "field, value, expect",
    [
        (
            "bw_by_size",
            5,
            "link.intra.bw_by_size must be a table {message bytes = B/s, ...}, got 5",
        ),
        ("bw_by_size", {}, "link.intra.bw_by_size must be a table"),
        ("bw_by_size", {"1.5": 1e9}, "link.intra.bw_by_size: key '1.5' is not a positive integer"),
        ("nb_bw_by_size", {"0": 1e9}, "link.intra.nb_bw_by_size: key '0' is not a positive"),
        ("bw_by_size", {"64": -1.0}, "link.intra.bw_by_size.64 must be a finite positive number"),
        ("nb_bw_by_size", {"64": "fast"}, "link.intra.nb_bw_by_size.64 must be a finite positive"),
    ],
)
def test_bad_tables_are_one_line_naming_the_field(field, value, expect):
    with pytest.raises(UserError, match="^cluster file cluster: " + expect.replace(".", r"\.")):
        cluster(**{field: value})


MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100)
LAYOUTS = [
    Layout(dp=2, batch_size=8, bucket_mb=0.05),
    Layout(dp=2, batch_size=8, bucket_mb=100),
    Layout(dp=2, zero=1, batch_size=8),
    Layout(dp=2, zero=3, batch_size=8),
    Layout(dp=2, batch_size=8, grad_comm="powersgd"),
    Layout(dp=2, batch_size=8, grad_comm="bf16"),
    Layout(tp=2, batch_size=8),
    Layout(tp=2, batch_size=8, sequence_parallel=True, act_comm="bf16"),
    Layout(pp=2, micro_batches=4, batch_size=8),
    Layout(pp=2, dp=2, micro_batches=2, batch_size=8, schedule="zb-h1"),
]


@pytest.mark.parametrize("share", [1.0, 2.0])
def test_a_table_of_one_rate_prices_exactly_as_no_table(share):
    """Every cost site passes its size to the table: a table that holds bw (and nb_bw) at every size gives the
    same seconds, bit for bit, as the file without it."""
    plain = cluster(nb_bw=4e9)
    flat = cluster(
        nb_bw=4e9,
        bw_by_size={"1024": 5e9, "1048576": 5e9, "1073741824": 5e9},
        nb_bw_by_size={"1024": 4e9, "1073741824": 4e9},
    )
    for lay in LAYOUTS:
        a = predict(MODEL, lay, plain, "fp32", share, checkpoint_interval=5).time
        b = predict(MODEL, lay, flat, "fp32", share, checkpoint_interval=5).time
        assert a == b, lay
        # and each layout's own messages reach a table: at half the rate above 64 bytes (the loss and norm scalars
        # at bw) and no checkpoint, its step is longer
        half = cluster(
            nb_bw=4e9,
            bw_by_size={"64": 5e9, "128": 2.5e9},
            nb_bw_by_size={"64": 4e9, "128": 2e9},
        )
        slower, before = (predict(MODEL, lay, c, "fp32", share).time for c in (half, plain))
        assert slower["step"] > before["step"], lay


def test_small_messages_slower_raise_tp_and_not_one_big_bucket():
    """TP's collectives are of one micro-batch's activations (8 x 64 x 64 floats, 128 KiB); dp's one bucket holds
    the whole gradient (439 KiB): a table 10x slower at 128 KiB, at bw from 256 KiB, reaches only the first."""
    slow_small = cluster(bw_by_size={"131072": 5e8, "262144": 5e9})
    tp, dp = Layout(tp=2, batch_size=8), Layout(dp=2, batch_size=8, bucket_mb=100)
    grad_bytes = 4 * sum(math.prod(s) for s in _shapes())
    assert grad_bytes > 262144
    tp_plain, tp_slow = (predict(MODEL, tp, c, "fp32").time for c in (cluster(), slow_small))
    dp_plain, dp_slow = (predict(MODEL, dp, c, "fp32").time for c in (cluster(), slow_small))
    assert tp_slow["step"] > tp_plain["step"] * 1.05
    assert dp_slow["dp_exposed"] == dp_plain["dp_exposed"] > 0
    # only the loss and norm scalars (8 bytes) are slower: nanoseconds
    assert dp_slow["step"] == pytest.approx(dp_plain["step"], rel=1e-4)


def _shapes():
    from hpc_llm.plan.memory import specs_of, stage_plan

    return [s.shape for s in specs_of(MODEL, 1, stage_plan(MODEL, Layout(), 0))]


# -- each collective kind priced by its own table (link.*.collectives) ------------------------------------------------

KIND_LAYOUTS = {
    "dp": Layout(dp=2, batch_size=8, bucket_mb=0.05),
    "dp bf16": Layout(dp=2, batch_size=8, bucket_mb=0.05, grad_comm="bf16"),
    "zero1": Layout(dp=2, zero=1, batch_size=8),
    "zero1 bf16": Layout(dp=2, zero=1, batch_size=8, grad_comm="bf16"),
    "zero3": Layout(dp=2, zero=3, batch_size=8),
    "tp": Layout(tp=2, batch_size=8),
    "tp sp": Layout(tp=2, batch_size=8, sequence_parallel=True),
    "tp bf16": Layout(tp=2, batch_size=8, act_comm="bf16"),
    "tp sp bf16": Layout(tp=2, batch_size=8, sequence_parallel=True, act_comm="bf16"),
    "pp": Layout(pp=2, micro_batches=4, batch_size=8),
}


@pytest.mark.parametrize(
    "kinds, slower",
    [
        (("ireduce_scatter",), {"zero1", "zero3"}),
        (("allgather",), {"zero1", "zero1 bf16"}),
        (("iallgatherv",), {"zero3", "tp sp bf16"}),
        (("reduce_scatter_along", "allgather_along"), {"tp sp"}),
        # one phase of the 16-bit allreduce alone: that allreduce as before; ZeRO-1's is the alltoallv alone
        (("ialltoallv",), {"zero1 bf16", "tp sp bf16"}),
        (
            ("ialltoallv", "iallgatherv"),
            {"dp bf16", "zero1 bf16", "zero3", "tp bf16", "tp sp bf16"},
        ),
        (("p2p",), {"pp"}),
    ],
)
def test_each_kind_table_reaches_the_layouts_that_make_that_call(kinds, slower):
    """A table 100x below bw for some kinds slows exactly the layouts whose step makes those calls (and no others);
    a table at bw itself changes no layout's step (the tables replace the fallback rate, not the formula)."""
    slow = cluster(collectives={k: {"64": 5e7} for k in kinds})
    same = cluster(collectives={k: {"64": 5e9} for k in kinds})
    plain = cluster()
    for name, lay in KIND_LAYOUTS.items():
        before = predict(MODEL, lay, plain, "fp32").time["step"]
        assert (predict(MODEL, lay, slow, "fp32").time["step"] > before) == (name in slower), name
        if not any(k.startswith("i") for k in kinds):  # a blocking kind: its fallback is bw itself
            assert predict(MODEL, lay, same, "fp32").time["step"] == pytest.approx(before), name


def test_a_sixteen_bit_allreduce_is_its_two_phases():
    link = K.Link(
        1e-6,
        1e9,
        1e9,
        1.0,
        collectives=(("ialltoallv", ((64.0, 2e8),)), ("iallgatherv", ((64.0, 4e8),))),
    )
    S = 1e6
    assert link.seconds("allreduce16", S, 4) == pytest.approx(
        K.reduce_scatter(S, 4, 1e-6, 2e8) + K.allgather(S, 4, 1e-6, 4e8)
    )
    # without both tables: an allreduce of the words at the rate the caller priced it at before
    half = K.Link(1e-6, 1e9, 5e8, 1.0, collectives=(("ialltoallv", ((64.0, 2e8),)),))
    assert half.seconds("allreduce16", S, 4) == K.allreduce(S, 4, 1e-6, 5e8)
    assert half.seconds("allreduce16", S, 4, nonblocking=False) == K.allreduce(S, 4, 1e-6, 1e9)


@pytest.mark.parametrize(
    "value, expect",
    [
        (5, r"\[link\.intra\.collectives\] must be a table, got 5"),
        (
            {"allreduce": {"64": 1e9}},
            r"link\.intra\.collectives\.allreduce: expected one of ireduce_scatter, ",
        ),
        ({"p2p": {"x": 1e9}}, r"link\.intra\.collectives\.p2p: key 'x' is not a positive integer"),
        ({"p2p": {"64": 0}}, r"link\.intra\.collectives\.p2p\.64 must be a finite positive number"),
    ],
)
def test_bad_kind_tables_are_one_line_naming_the_field(value, expect):
    with pytest.raises(UserError, match="^cluster file cluster: " + expect):
        cluster(collectives=value)
