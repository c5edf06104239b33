"""Cluster files (CLUSTER.toml, the figures plan/cluster.py's docstring lists): read into a Cluster, every figure
checked with a one-line error naming the file and the field, and written back (`bench calibrate`)."""

from __future__ import annotations

import math
from pathlib import Path

from hpc_llm.config import read_toml
from hpc_llm.errors import UserError
from hpc_llm.plan.cluster import KERNELS, MEASURED, Cluster, Link

REQUIRED = {
    "node": ("devices", "memory_bytes"),
    "compute": ("gemm_call_s", "call_s", "transcendental_rate", "scatter_rate", "elementwise_bw"),
    "storage": ("write_bw",),
}


CAST_KEYS = ("to_bfloat16", "from_bfloat16", "to_float16", "from_float16")


def load_cluster(path: str | Path) -> Cluster:
    return cluster_from_dict(read_toml(path, "cluster file"), str(path))


class _Figures:
    """A cluster file's dict read with its checks: every error one line naming the file and the figure. Every figure
    is a finite number (positive, or non-negative where zero means "free"; node.devices an integer), every section a
    table: NaN, infinities, strings, booleans, lists where tables belong are refused, never taken."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def fail(self, text: str) -> UserError:
        return UserError(f"cluster file {self.where}: {text}")

    def section(self, name: str, required: bool = False) -> dict:
        """A table of the file by its dotted name ({} when absent and not required)."""
        sec = self.d
        for i, part in enumerate(name.split(".")):
            sec = sec.get(part)
            if sec is None:
                if required:
                    raise self.fail(f"missing section [{name}]")
                return {}
            if not isinstance(sec, dict):
                here = ".".join(name.split(".")[: i + 1])
                raise self.fail(f"[{here}] must be a table, got {_shown(sec)}")
        return sec

    def need(self, section: str, key: str):
        sec = self.section(section)
        if key not in sec:
            raise self.fail(f"missing figure {section}.{key}")
        return sec[key]

    def number(self, section: str, key: str, value, positive: bool = True) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (value <= 0 if positive else value < 0)
        ):
            kind = "positive" if positive else "non-negative"
            raise self.fail(f"{section}.{key} must be a finite {kind} number, got {_shown(value)}")
        return float(value)

    def optional(self, section: str, key: str) -> float | None:
        """A positive figure the file may leave out (None)."""
        value = self.section(section).get(key)
        return None if value is None else self.number(section, key, value)

    def integer(self, section: str, key: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"{section}.{key} must be a positive integer, got {_shown(value)}")
        return value

    def fraction(self, section: str, key: str, value) -> float:
        v = self.number(section, key, value, positive=False)
        if v > 1:
            raise self.fail(f"{section}.{key} must be a fraction in [0, 1], got {_shown(value)}")
        return v

    def table(self, section: str, key: str, value) -> list:
        if not isinstance(value, dict) or not value:
            raise self.fail(
                f"{section}.{key} must be a table {{size = value, ...}}, got {_shown(value)}"
            )
        out = []
        for k, v in value.items():
            try:
                x = float(k)
            except ValueError:
                x = math.nan
            if not (math.isfinite(x) and x > 0):
                raise self.fail(f"{section}.{key}: key {k!r} is not a finite positive number")
            out.append((x, self.number(section, f"{key}.{k}", v)))
        return sorted(out)

    def size_table(self, section: str, key: str, value) -> tuple:
        """{message bytes = B/s}: sizes positive integers, rates as any rate."""
        if not isinstance(value, dict) or not value:
            raise self.fail(
                f"{section}.{key} must be a table {{message bytes = B/s, ...}}, got {_shown(value)}"
            )
        for k in value:
            if not (k.isascii() and k.isdigit() and int(k) > 0):
                raise self.fail(f"{section}.{key}: key {k!r} is not a positive integer (bytes)")
        return tuple(self.table(section, key, value))

    def gemm(self) -> dict:
        gemm_sec = self.section("compute.gemm")
        if not gemm_sec:
            raise self.fail("missing figure compute.gemm.float32 (matmul FLOP/s by shape class)")
        return {dt: self.table("compute.gemm", dt, t) for dt, t in gemm_sec.items()}

    def tables_by_dtype(self, section: str) -> dict:
        """An optional [compute.gemm_batched] or [compute.gemm_wide]: {dtype: table}."""
        return {dt: self.table(section, dt, t) for dt, t in self.section(section).items()}

    def links(self) -> dict:
        links = {}
        for level in ("intra", "inter"):
            # a one-node (inter) or one-rank (intra) machine: needed only by layouts that use it
            if "link" not in self.d or level not in self.section("link"):
                continue
            where_l = f"link.{level}"
            sec = self.section(where_l)
            lat, bw = self.need(where_l, "latency_s"), self.need(where_l, "bw")
            kinds = sec.get("collectives", {})
            if not isinstance(kinds, dict):
                raise self.fail(f"[{where_l}.collectives] must be a table, got {_shown(kinds)}")
            for k in kinds:
                if k not in MEASURED:
                    raise self.fail(
                        f"{where_l}.collectives.{k}: expected one of {', '.join(MEASURED)}"
                    )
            by_size = sec.get("bw_by_size")
            nb_by_size = sec.get("nb_bw_by_size", None if "nb_bw" in sec else by_size)
            links[level] = Link(
                self.number(where_l, "latency_s", lat, positive=False),
                self.number(where_l, "bw", bw),
                self.number(where_l, "nb_bw", sec.get("nb_bw", bw)),
                self.fraction(where_l, "overlap", sec.get("overlap", 1.0)),
                () if by_size is None else self.size_table(where_l, "bw_by_size", by_size),
                () if nb_by_size is None else self.size_table(where_l, "nb_bw_by_size", nb_by_size),
                tuple(
                    (k, self.size_table(f"{where_l}.collectives", k, t)) for k, t in kinds.items()
                ),
            )
        return links

    def cast(self) -> dict:
        sec = self.named_section("compute.cast", CAST_KEYS)
        return {k: self.number("compute.cast", k, v) for k, v in sec.items()}

    def kernels(self) -> dict:
        sec = self.named_section("compute.kernels", KERNELS)
        return {k: self.table("compute.kernels", k, t) for k, t in sec.items()}

    def named_section(self, where: str, names) -> dict:
        """Section `where`, every key one of `names` (an unknown one is a UserError naming it)."""
        sec = self.section(where)
        for k in sec:
            if k not in names:
                raise self.fail(f"{where}.{k}: expected one of {', '.join(names)}")
        return sec

    def backend(self) -> str:
        backend = self.section("compute").get("backend", "numpy")
        if backend not in ("numpy", "cupy"):
            raise self.fail(f'compute.backend must be "numpy" or "cupy", got {_shown(backend)}')
        return backend

    def text(self, key: str, default: str) -> str:
        value = self.d.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{key} must be a string, got {_shown(value)}")
        return value

    def sources(self) -> dict:
        sec = self.section("sources")
        for k, v in sec.items():
            if not isinstance(v, (str, dict)):
                raise self.fail(f"sources.{k} must be text, got {_shown(v)}")
        return dict(sec)


def _shown(value) -> str:
    """A value as the refusal shows it: its repr, cut short, and its TOML kind for a table or an array."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array {value!r}"[:60]
    return repr(value)[:60]


def cluster_from_dict(d: dict, where: str = "cluster") -> Cluster:
    f = _Figures(d, where)
    vals = {s: {k: f.need(s, k) for k in keys} for s, keys in REQUIRED.items()}
    gemm, links, cast, backend = f.gemm(), f.links(), f.cast(), f.backend()
    c, n = vals["compute"], vals["node"]
    return Cluster(
        name=f.text("name", where),
        devices=f.integer("node", "devices", n["devices"]),
        memory_bytes=f.number("node", "memory_bytes", n["memory_bytes"]),
        runtime_bytes=f.number(
            "node", "runtime_bytes", f.section("node").get("runtime_bytes", 0.0), positive=False
        ),
        gemm=gemm,
        gemm_call_s=f.number("compute", "gemm_call_s", c["gemm_call_s"], positive=False),
        call_s=f.number("compute", "call_s", c["call_s"], positive=False),
        transcendental_rate=f.number("compute", "transcendental_rate", c["transcendental_rate"]),
        scatter_rate=f.number("compute", "scatter_rate", c["scatter_rate"]),
        elementwise_bw=f.table("compute", "elementwise_bw", c["elementwise_bw"]),
        links=links,
        write_bw=f.number("storage", "write_bw", vals["storage"]["write_bw"]),
        backend=backend,
        path=where,
        cast=cast,
        tiny_block_s=f.optional("compute", "tiny_block_s"),
        kernels=f.kernels(),
        gemm_batched=f.tables_by_dtype("compute.gemm_batched"),
        gemm_wide=f.tables_by_dtype("compute.gemm_wide"),
        sources=f.sources(),
    )


def _toml_value(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def to_toml(d: dict, header: str = "") -> str:
    """A cluster dict (two levels of tables at most, plus inline tables of numbers) as TOML text."""
    lines = [f"# {line}" for line in header.splitlines()]

    def emit(prefix: str, table: dict) -> None:
        # tables of numbers by size inside a section: {"65536" = 2e11, ...}
        def inline(k, v) -> bool:
            return bool(prefix) and (
                k in ("elementwise_bw", "bw_by_size", "nb_bw_by_size")
                or prefix in ("compute.gemm", "compute.gemm_batched", "compute.gemm_wide")
                or prefix == "compute.kernels"
                or prefix.endswith(".collectives")
            )

        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) or inline(k, v)}
        subs = {k: v for k, v in table.items() if k not in scalars}
        if prefix and scalars:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            if isinstance(v, dict):
                body = ", ".join(f'"{kk}" = {_toml_value(vv)}' for kk, vv in v.items())
                lines.append(f"{k} = {{ {body} }}")
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in subs.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", d)
    return "\n".join(lines) + "\n"
