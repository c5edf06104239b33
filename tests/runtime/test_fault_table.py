"""docs/reliability.md's fault table (scripts/bench/fault_table.py): its cases cover every verb at 1 to 4 ranks, and
the CI subset runs here through the script's own runner (expected exit, the line, inputs intact). The full table:
`python scripts/bench/fault_table.py --data DIR`."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO

spec = importlib.util.spec_from_file_location("fault_table", REPO / "scripts/bench/fault_table.py")
fault_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fault_table)
CI = [c for c in fault_table.CASES if c.ci]


@pytest.mark.timeout(30)
def test_the_table_covers_every_verb_at_one_to_four_ranks():
    cases = fault_table.CASES
    assert len(cases) >= 100
    verbs = {"train", "generate", "eval", "prepare", "merge-lora", "import-gpt2", "plan", "inspect"}
    assert {c.verb for c in cases} == verbs
    assert {c.ranks for c in cases} == {1, 2, 4}
    assert {c.disk for c in cases} == {"", "full", "ro"}
    assert len({(c.verb, c.name, c.layout) for c in cases}) == len(cases)


@pytest.fixture(scope="module")
def inputs(data_dir, tmp_path_factory):
    return fault_table.Inputs(data_dir, tmp_path_factory.mktemp("fault_table"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CI, ids=[f"{c.verb}: {c.name} ({c.layout})" for c in CI])
def test_a_ci_case_of_the_fault_table(case, inputs):
    row = fault_table.row_of(case, [fault_table.run_case(case, inputs)])
    assert row["ok"], row
