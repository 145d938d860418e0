"""Reading one TOML table at a time, with errors that name the file, the key and what was
expected: the person reading them is a PACS administrator looking at a systemd journal, not
at a Python traceback."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeAlias

from relay.config.model import ConfigError, describe_value

# The builtins, for annotations inside Table, whose readers are called str, int, float, bool.
_Str: TypeAlias = str
_Int: TypeAlias = int
_Float: TypeAlias = float
_Bool: TypeAlias = bool


class Table:
    """One TOML table being read: knows its file and key prefix for error messages."""

    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: {prefix}: expected a table, got {describe_value(data)}")
        self.data: dict[str, Any] = data

    def error(self, key: str, expected: str, got: Any = None, *,
              show_got: bool = True) -> ConfigError:
        where = f"{self.prefix}.{key}" if self.prefix else key
        tail = f", got {describe_value(got)}" if show_got else ""
        return ConfigError(f"{self.file}: {where}: expected {expected}{tail}")

    def check_keys(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                raise self.error(key, "one of the known keys: " + ", ".join(allowed),
                                 show_got=False)

    def has(self, key: str) -> bool:
        return key in self.data

    def str_list(self, key: str, *, pattern: re.Pattern[str] | None = None,
                 what: str = "a string") -> tuple[str, ...]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"a list of {what}s", value)
        for item in value:
            if not isinstance(item, str) or (pattern is not None and not pattern.match(item)):
                raise self.error(key, f"a list of {what}s", item)
        return tuple(value)

    def path(self, key: str, what: str = "a file path") -> Path:
        """A path; relative ones are relative to the config file's folder."""
        path = Path(self.str(key, what=what))
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def sub(self, key: str) -> Table:
        prefix = f"{self.prefix}.{key}" if self.prefix else key
        return Table(self.file, prefix, self.data.get(key, {}))

    def array_of_tables(self, key: str) -> list[Table]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"an array of tables ([[{key}]])", value)
        return [Table(self.file, f"[[{key}]][{i}]", item) for i, item in enumerate(value)]

    # --- typed values (these names shadow the builtins inside the class: aliases below) ---

    def str(self, key: _Str, default: _Str | None = None, *, choices: Iterable[_Str] = (),
            pattern: re.Pattern[_Str] | None = None, what: _Str = "a string") -> _Str:
        if key not in self.data:
            if default is None:
                raise self.error(key, f"{what} (this key is required)", show_got=False)
            return default
        value = self.data[key]
        choices = tuple(choices)
        if not isinstance(value, _Str):
            raise self.error(key, what, value)
        if choices and value not in choices:
            raise self.error(key, "one of " + ", ".join(repr(c) for c in choices), value)
        if pattern is not None and not pattern.match(value):
            raise self.error(key, what, value)
        return value

    def int(self, key: _Str, default: _Int | None, *, lo: _Int, hi: _Int) -> _Int:
        if key not in self.data:
            if default is None:
                raise self.error(key, f"an integer {lo}-{hi} (this key is required)",
                                 show_got=False)
            return default
        value = self.data[key]
        if isinstance(value, _Bool) or not isinstance(value, _Int) or not lo <= value <= hi:
            raise self.error(key, f"an integer {lo}-{hi}", value)
        return value

    def float(self, key: _Str, default: _Float, *, lo: _Float, hi: _Float) -> _Float:
        value = self.data.get(key, default)
        if (isinstance(value, _Bool) or not isinstance(value, _Int | _Float)
                or not lo <= value <= hi):
            raise self.error(key, f"a number {lo:g}-{hi:g}", value)
        return _Float(value)

    def bool(self, key: _Str, default: _Bool) -> _Bool:
        value = self.data.get(key, default)
        if not isinstance(value, _Bool):
            raise self.error(key, "true or false", value)
        return value
