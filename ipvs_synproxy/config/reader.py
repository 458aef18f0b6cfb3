"""YAML with line numbers, and the checks every section of the file shares.

A :class:`Reader` walks what :func:`parse_yaml` returns and turns a bad value
into a :class:`ConfigError` naming ``file:line`` and the key path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import yaml

from ipvs_synproxy.kernel.model import ModelError, parse_int


class ConfigError(ModelError):
    """A bad config value: ``source`` is ``file:line``, ``field`` the key path."""


# ---- YAML with line numbers -------------------------------------------------------------


class YamlMap(dict[Any, Any]):
    """A YAML mapping that remembers its own line and each key's line (1-based)."""

    line: int
    key_lines: dict[Any, int]


class YamlSeq(list[Any]):
    line: int
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry line numbers and which
    refuses duplicate keys (PyYAML silently keeps the last one)."""

    filename = "<config>"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> YamlMap:
    loader.flatten_mapping(node)
    out = YamlMap()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"{loader.filename}:{line}", "key",
                              f"not a valid key: {key!r}") from None
        if key in out:
            raise ConfigError(f"{loader.filename}:{line}", str(key),
                              f"duplicate key (first on line {out.key_lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> YamlSeq:
    out = YamlSeq(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, filename: str) -> object:
    loader = _Loader(text)
    loader.filename = filename
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{filename}:{line}", "yaml",
                          f"{exc.problem or exc.context or 'syntax error'}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}:1", "yaml", str(exc)) from None
    finally:
        loader.dispose()


class Reader:
    """Walks the parsed YAML, keeping the file name for messages."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def err(self, line: int, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.filename}:{line}", path, message)

    def at(self, m: YamlMap, key: str) -> int:
        return m.key_lines.get(key, m.line)

    def mapping(self, value: object, line: int, path: str, keys: Sequence[str]) -> YamlMap:
        if not isinstance(value, YamlMap):
            raise self.err(getattr(value, "line", line), path,
                           f"expected a mapping, got {typename(value)}")
        for k in value:
            if k not in keys:
                raise self.err(value.key_lines[k], f"{path}.{k}" if path else str(k),
                               f"unknown key {k!r} (expected one of: {', '.join(keys)})")
        return value

    def seq(self, value: object, line: int, path: str) -> YamlSeq:
        if not isinstance(value, YamlSeq):
            raise self.err(getattr(value, "line", line), path,
                           f"expected a list, got {typename(value)}")
        return value

    def parse(self, m: YamlMap, key: str, path: str, fn: Callable[[str], Any]) -> Any:
        """Call ``fn(source)``; a ModelError becomes a ConfigError at ``key``."""
        where = f"{self.filename}:{self.at(m, key)}"
        try:
            return fn(where)
        except ModelError as exc:
            raise ConfigError(where, f"{path}.{key}" if path else key, exc.message) from None


def typename(value: object) -> str:
    if value is None:
        return "nothing"
    return {"YamlMap": "a mapping", "YamlSeq": "a list", "str": f"the string {value!r}",
            "bool": f"the boolean {value!r}", "int": f"the integer {value!r}",
            "float": f"the number {value!r}"}.get(type(value).__name__, type(value).__name__)


def read_bool(value: object, source: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ModelError(source, name, f"not a boolean (true/false): {value!r}")
    return value


def read_str(value: object, source: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelError(source, name, f"not a string: {value!r}")
    return value.strip()


def int_field(value: object, name: str, source: str) -> int:
    return parse_int(value, source, name)
