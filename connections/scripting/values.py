"""The values scripts fill in (ScriptObject) and their conversion to plain JSON data."""

from __future__ import annotations

import math
import sys
from itertools import repeat
from json.encoder import encode_basestring_ascii
from types import NoneType
from typing import Any

from exalate_web import jsonio

# Deeper nesting than this is a runaway structure, not tracker data.
MAX_DEPTH = 100

_STORABLE = "text, numbers, booleans, None, lists and dicts"
_JSON_CONTAINERS = frozenset({dict, list, tuple})
_JSON_TYPES = frozenset({str, int, float, bool, NoneType}) | _JSON_CONTAINERS
_JSON_BASES = (str, int, float, dict, list, tuple)


class ScriptObject(dict):
    """A dict whose fields read and write as attributes: ``replica.summary = issue.summary``.

    Reading a field that was never set gives None, as an unset field of a tracker does. Field
    names that are dict methods (``items``, ``keys``, ...) are only reachable as ``obj["items"]``.
    Values must stay JSON-like; a write is checked at its top level, the whole value by
    ``to_plain`` / ``output_size`` once the script is done.
    """

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.update(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or hasattr(dict, name):
            raise AttributeError(f"'{name}' can't be set as an attribute; write obj[{name!r}] = ... instead")
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"field names must be text, not {type(key).__name__}")
        if not (value is None or isinstance(value, _JSON_BASES)):
            raise TypeError(f"a {type(value).__name__} can't be stored in field '{key}'; use {_STORABLE}")
        super().__setitem__(key, value)

    @classmethod
    def of_checked(cls, fields: dict[str, Any]) -> ScriptObject:
        """A ScriptObject of ``fields`` whose keys are text and values JSON-like already (plain
        data handed to a script), filled without checking each write again."""
        made = cls()
        dict.update(made, fields)
        return made

    # dict's own versions of these write without calling __setitem__, so they would skip the check.
    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> ScriptObject:
        self.update(other)
        return self

    def copy(self) -> ScriptObject:
        return ScriptObject(self)


class _NotStorable(Exception):
    pass


def _json_kind(value: Any) -> type:
    """The JSON type ``value`` stores as; a subclass (ScriptObject, a tracker's str) counts as its base."""
    kind = type(value)
    if kind in _JSON_TYPES:
        return kind
    for base in _JSON_BASES:
        if isinstance(value, base):
            return base
    raise _NotStorable(f"a {kind.__name__} can't be stored; use {_STORABLE}")


def _measure(value: Any, limit: int) -> int:
    """The compact JSON size of ``value``, stopping once past ``limit``.

    Runs after every script, so it is a flat loop; a structure that shares one big list a
    thousand times costs no more than the limit to reject.
    """
    size = 0
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        kind = type(item)
        if kind not in _JSON_TYPES:
            kind = _json_kind(item)
        if kind is str:
            size += len(encode_basestring_ascii(item))
        elif kind is NoneType or kind is bool:
            size += 5 if item is False else 4  # false; true and null
        elif kind is int:
            try:
                size += len(str(item))
            except ValueError:
                raise _NotStorable("the number is too large to store") from None
        elif kind is float:
            if not math.isfinite(item):
                raise _NotStorable(f"{item} can't be stored, only finite numbers")
            size += len(repr(item))
        elif depth >= MAX_DEPTH:
            raise _NotStorable(f"nested more than {MAX_DEPTH} levels deep")
        else:
            size += 2 + max(len(item) - 1, 0)
            if kind is dict:
                for key in item:
                    if type(key) is not str and not isinstance(key, str):
                        raise _NotStorable(f"keys must be text, not {type(key).__name__}")
                    size += len(encode_basestring_ascii(key)) + 1
                item = item.values()
            pending += zip(item, repeat(depth + 1))
        if size > limit:
            break
    return size


def _locate(value: Any, path: str, depth: int = 0) -> str | None:
    """Where in ``value`` something can't be stored, and why; None if nothing.

    Children are searched last first, the order ``_measure`` meets them in, so this costs no more.
    """
    try:
        kind = _json_kind(value)
        if kind not in _JSON_CONTAINERS:
            _measure(value, sys.maxsize)
            return None
        if depth >= MAX_DEPTH:
            raise _NotStorable(f"nested more than {MAX_DEPTH} levels deep")
    except _NotStorable as error:
        return f"{path}: {error}"
    if kind is dict:
        for key in value:
            if not isinstance(key, str):
                return f"{path}: keys must be text, not {type(key).__name__}"
        children = [(f".{key}" if key.isidentifier() else f"[{key!r}]", item) for key, item in value.items()]
    else:
        children = [(f"[{index}]", item) for index, item in enumerate(value)]
    for step, item in reversed(children):
        found = _locate(item, path + step, depth + 1)
        if found:
            return found
    return None


def to_plain(value: Any, *, name: str = "value", checked: bool = False) -> Any:
    """``value`` as plain JSON-able data (ScriptObjects become dicts, tuples lists).

    Raises TypeError naming the place (``replica.labels[2]``) of anything that isn't JSON-like.
    ``checked``: ``output_size`` has measured it already (a script's output, once it is done),
    and it is not measured again.
    """
    if not checked:
        output_size(value, name=name)
    return jsonio.loads(jsonio.dumps(value))


def output_size(value: Any, *, limit: int | None = None, name: str = "value") -> int:
    """The length of ``value`` as compact, ASCII-only JSON; past ``limit`` it stops counting early.

    Raises TypeError like ``to_plain`` for values that aren't JSON-like.
    """
    try:
        return _measure(value, sys.maxsize if limit is None else limit)
    except _NotStorable:
        raise TypeError(_locate(value, name)) from None
