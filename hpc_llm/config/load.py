"""Reading a run configuration: a TOML file (tomllib) and `--set section.key=value` overrides onto the sections'
defaults, each value coerced to its field's type with a one-line error naming the field; load_config validates what
it loads (checks.py), before any compute, and returns a config that is not changed afterwards: what the start-up
resolves later (model.vocab_size from the data or a checkpoint) makes a new one (Config.with_vocab)."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from hpc_llm.config.checks import validated
from hpc_llm.config.sections import Config
from hpc_llm.errors import UserError


def _coerce(section: str, name: str, value, typ: type):
    where = f"{section}.{name}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:  # list[int]: a TOML array, or `--set a.b=[3, 1]` / `--set a.b=3,1`
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            try:
                value = [int(v) for v in text.split(",")] if text.strip() else []
            except ValueError:
                pass
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return list(value)
        raise UserError(f"config field {where}: expected a list of integers, got {value!r}")
    raise UserError(f"config field {where}: expected {typ.__name__}, got {value!r}")


def _apply(cfg: Config, section: str, values: dict, source: str) -> None:
    if section not in {f.name for f in fields(cfg)}:
        raise UserError(
            f"{source}: unknown section [{section}] (expected one of: "
            f"{', '.join(f.name for f in fields(cfg))})"
        )
    if not isinstance(values, dict):
        raise UserError(f"{source}: [{section}] must be a table")
    sub = getattr(cfg, section)
    types = {f.name: f.type for f in fields(sub)}
    for key, value in values.items():
        if key not in types:
            raise UserError(
                f"{source}: unknown key {section}.{key} (expected one of: {', '.join(types)})"
            )
        if types[key] == "list[str]":
            setattr(sub, key, _coerce_strings(f"{section}.{key}", value))
            continue
        typ = {"int": int, "float": float, "str": str, "bool": bool, "list[int]": list}[types[key]]
        setattr(sub, key, _coerce(section, key, value, typ))


def _coerce_strings(where: str, value) -> list[str]:
    """list[str]: a TOML array of strings, or `--set a.b=[x, y]` / `--set a.b=x,y` (quotes optional)."""
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]")
        value = [v.strip().strip("\"'") for v in text.split(",")] if text.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise UserError(f"config field {where}: expected a list of non-empty strings, got {value!r}")


def parse_override(text: str) -> tuple[str, str, str]:
    """`section.key=value` -> (section, key, value-as-text)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    lhs, value = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    return section, key, value.strip()


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file's tables; a missing file or bad TOML is a one-line UserError naming `what` file it was."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, expected a TOML file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {path}: not UTF-8 text (byte {e.start}), expected a TOML file"
        ) from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise UserError(f"{what} {path}: empty, expected TOML tables")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path}: invalid TOML ({e})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or defaults when path is None), apply overrides, validate."""
    cfg = Config()
    if path is not None:
        data = read_toml(path, "config file")
        for section, values in data.items():
            _apply(cfg, section, values, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, {key: value}, "--set")
    return validated(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        _apply(cfg, section, values, "checkpoint config")
    return cfg
