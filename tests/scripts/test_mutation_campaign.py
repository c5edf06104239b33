"""scripts/dev/mutation_campaign.py finds a mutant's function wherever it is defined (parsing only: no test suite runs).

A fake repository in tmp_path holds one function; its mutant applies in file A, still applies after the function
moved to another file in another folder, and is reported stale, with the reason, where the function is missing or
defined twice or the snippet does not occur exactly once. `test_every_mutant_applies` checks the real table against
this tree's hpc_llm/ (run it alone: pytest -m mutants).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import REPO

# the campaign imports its table as a script would: `mutants` beside it
sys.path.insert(0, str(REPO / "scripts" / "dev"))

from mutants import MUTANTS, Mutant  # noqa: E402
from mutation_campaign import Sources, find_tests, resolve  # noqa: E402

SOURCE = '''"""A module."""


def helper(x):
    return x + 1


class Adam:
    def step(self, lr):
        scale = lr * 2
        return scale
'''

STEP = Mutant(
    "adam-lr-once", "Adam.step", "scale = lr * 2", "scale = lr", "lr not doubled", ("test_a.py",)
)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_mutant_applies_in_its_file(tmp_path):
    root = write(tmp_path, {"hpc_llm/__init__.py": "", "hpc_llm/a.py": SOURCE})
    found = resolve(STEP, Sources.directory(root))
    assert found.why == "" and found.file == "hpc_llm/a.py"
    assert "        scale = lr\n" in found.text and found.text.count("lr * 2") == 0
    assert found.text.replace("scale = lr\n", "scale = lr * 2\n") == SOURCE


def test_mutant_follows_its_function_to_another_file(tmp_path):
    moved = SOURCE.replace("class Adam:", "class Other:\n    pass\n\n\nclass Adam:")
    root = write(tmp_path, {"hpc_llm/a.py": '"""Emptied."""\n', "hpc_llm/optim.py": moved})
    found = resolve(STEP, Sources.directory(root))
    assert found.why == "" and found.file == "hpc_llm/optim.py"
    assert "        scale = lr\n" in found.text


def test_snippet_counts_only_inside_the_function(tmp_path):
    # the same line in another function does not make the mutant ambiguous
    other = "\n\ndef unrelated(lr):\n    scale = lr * 2\n    return scale\n"
    root = write(tmp_path, {"hpc_llm/a.py": SOURCE + other})
    found = resolve(STEP, Sources.directory(root))
    assert found.why == ""
    assert found.text.endswith(other)  # the other function untouched


@pytest.mark.parametrize(
    "files, mutant, reason",
    [
        (
            {"hpc_llm/a.py": SOURCE},
            Mutant("m", "Adam.gone", "x", "y", "", ()),
            "no function Adam.gone",
        ),
        (
            {"hpc_llm/a.py": SOURCE, "hpc_llm/b/c.py": SOURCE},
            STEP,
            "Adam.step is ambiguous, defined 2 times: hpc_llm.a.Adam.step (hpc_llm/a.py:9), "
            "hpc_llm.b.c.Adam.step (hpc_llm/b/c.py:9)",
        ),
        ({"hpc_llm/a.py": SOURCE}, Mutant("m", "helper", "return x", "return -x", "", ()), None),
        (
            {"hpc_llm/a.py": SOURCE},
            Mutant("m", "helper", "x + 2", "x", "", ()),
            "the snippet occurs 0 times in helper (hpc_llm/a.py:4-5)",
        ),
        (
            {"hpc_llm/a.py": SOURCE.replace("return x + 1", "x = x + 1\n    return x + 1")},
            Mutant("m", "helper", "x + 1", "x", "", ()),
            "the snippet occurs 2 times in helper (hpc_llm/a.py:4-6)",
        ),
    ],
    ids=["missing", "ambiguous", "applies", "snippet-absent", "snippet-twice"],
)
def test_stale_mutants_say_why(tmp_path, files, mutant, reason):
    found = resolve(mutant, Sources.directory(write(tmp_path, files)))
    if reason is None:
        assert found.text is not None and found.why == ""
    else:
        assert found.text is None and found.why.startswith("stale: ") and reason in found.why, (
            found.why
        )


def test_module_name_settles_an_ambiguous_function(tmp_path):
    root = write(tmp_path, {"hpc_llm/a.py": SOURCE, "hpc_llm/b/c.py": SOURCE})
    for name, file in (("a.Adam.step", "hpc_llm/a.py"), ("b.c.Adam.step", "hpc_llm/b/c.py")):
        found = resolve(
            Mutant("m", name, "scale = lr * 2", "scale = lr", "", ()), Sources.directory(root)
        )
        assert found.why == "" and found.file == file
    # a method is not a module-level function of the same name
    assert (
        "no function step"
        in resolve(Mutant("m", "step", "x", "y", "", ()), Sources.directory(root)).why
    )


def test_tests_are_found_by_basename(tmp_path):
    write(
        tmp_path,
        {
            "tests/test_a.py": "",
            "tests/model/test_b.py": "",
            "tests/x/test_c.py": "",
            "tests/y/test_c.py": "",
        },
    )
    present, missing = find_tests(
        ("test_a.py", "test_b.py::test_one[DP2]", "test_c.py", "test_d.py"), tmp_path
    )
    assert present == ("tests/test_a.py", "tests/model/test_b.py::test_one[DP2]")
    assert missing == [
        "test_c.py (ambiguous: tests/x/test_c.py, tests/y/test_c.py)",
        "test_d.py (no test_d.py under tests/)",
    ]


@pytest.mark.mutants
def test_every_mutant_applies():
    """Every mutant of the real table applies exactly once to this tree's hpc_llm/, and its tests exist."""
    sources = Sources.directory(REPO)
    ids = [m.id for m in MUTANTS]
    assert len(set(ids)) == len(ids)
    stale = [
        f"{m.id}: {resolve(m, sources).why}" for m in MUTANTS if resolve(m, sources).text is None
    ]
    assert not stale, "\n".join(stale)
    missing = [f"{m.id}: {t}" for m in MUTANTS for t in find_tests(m.tests, REPO)[1]]
    assert not missing, "\n".join(missing)
