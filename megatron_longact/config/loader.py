"""Load typed dataclass configs from YAML plus dotted command-line overrides.

``load_config(JobConfig, "examples/x.yaml", ["optim.lr=2e-5"])`` reads the YAML file, applies
the overrides, and builds the dataclass tree. Every unknown key is an error that names the
file and the key and suggests the nearest valid one; every value is converted to the field's
type or the error says which field wanted which type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megatron_longact.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A user error in a config file or override; the message says where and how to fix it."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _parse_scalar(text: str) -> Any:
    """Parses an override value with YAML rules (``1e-5`` -> float, ``true`` -> bool)."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-5" as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` overrides to a nested dict in place and returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        dotted, raw = item.split("=", 1)
        node = tree
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return tree


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return build_dataclass(annotation, value, where=where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls: type[T], values: dict, *, where: str = "") -> T:
    """Builds dataclass ``cls`` from a nested dict, coercing and validating every field.

    Raises:
        ConfigError: naming the dotted field for unknown keys (with the nearest valid key) or
            values of the wrong type; ``__post_init__`` ValueErrors are re-raised with the
            section name.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'.{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        # A check across sections (JobConfig) names its dotted fields itself.
        raise ConfigError(f"{where}: {err}" if where else str(err)) from err


def load_tree(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The nested dict :func:`load_config` builds from: YAML ``path`` (optional) plus dotted
    ``overrides``, before defaults and types (the planner asks it which sections a recipe sets).
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return apply_overrides(tree, list(overrides or []))


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Reads YAML ``path`` (optional), applies dotted ``overrides``, returns ``cls``.

    Errors name the file as well as the field, so a typo in a 200-line recipe is found at once.
    """
    tree = load_tree(path, overrides)
    source = "<defaults>" if path is None else str(Path(path))
    try:
        return build_dataclass(cls, tree)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def to_dict(config: Any) -> dict:
    """The config as plain nested dicts (for logging and for saving next to checkpoints)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """``config`` as YAML text that :func:`load_config` reads back unchanged."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
