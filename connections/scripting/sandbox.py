"""Runs admins' sync rules: RestrictedPython, plus guards for time, size, attribute reads and writes.

A script sees the names it is given, a short list of builtins, and the guard functions below;
the compile policy routes attribute reads and writes, size-growing operations, f-strings and
every statement through them. The limits:

* time: each statement, lambda and comprehension step calls ``_tick_``, which raises once the
  wall-clock limit has passed, and again on every later tick, so a script can't catch it and
  carry on. (sys.settrace can't do this on CPython 3.11: a one-line ``while True: pass`` gives
  no line events, and a trace function that raises is switched off for good.)
* size: a string, bytes or list longer than MAX_ITEMS, or an int over MAX_INT_BITS, is refused
  before it is built, when an operator, builtin or method could make one at once. Memory a
  script fills one small piece at a time is bounded only by the time limit.
* output: each ScriptObject handed in must stay JSON-like and under ``max_output_bytes``.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import itertools
import math
import operator
import re
import time
import types
from collections.abc import Callable, Collection, Mapping, Sized
from dataclasses import dataclass
from typing import Any, Literal

from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import (
    INSPECT_ATTRIBUTES,
    IOPERATOR_TO_STR,
    RestrictingNodeTransformer,
    copy_locations,
)

from connections.scripting.values import ScriptObject, output_size

ErrorKind = Literal["syntax", "runtime", "timeout", "limit"]

MAX_SOURCE_CHARS = 100_000
MAX_ITEMS = 1_000_000  # characters of a str, bytes of a bytes, elements of a list or tuple
MAX_INT_BITS = 10_000
MAX_DEBUG_CHARS = 100_000


class ScriptError(Exception):
    """A script that doesn't compile or failed while running, told in the admin's terms.

    ``kind`` is "syntax", "runtime", "timeout" or "limit"; ``line`` is 1-based in the script.
    """

    def __init__(self, message: str, *, script: str, kind: ErrorKind, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.script = script
        self.kind = kind
        self.line = line

    def __str__(self) -> str:
        where = f"{self.script} rules" if self.line is None else f"{self.script} rules, line {self.line}"
        return f"{where}: {self.message}"


class StopSync(Exception):
    """Raised through ``helpers.stop_sync(reason)``: this change is not to be synced."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class _Timeout(BaseException):
    """Past the time limit; not an Exception, so a script's ``except Exception`` lets it through."""


class _LimitError(Exception):
    """A result that would be too big, refused before it is built."""


# Size checks.

_SEQUENCES = (str, bytes, list, tuple)


def _check_items(count: int) -> None:
    if count > MAX_ITEMS:
        raise _LimitError(f"the result would have at least {count:,} characters or items; the limit is {MAX_ITEMS:,}")


def _check_bits(bits: float) -> None:
    if bits > MAX_INT_BITS:
        raise _LimitError(f"the number would have {int(bits):,} bits; the limit is {MAX_INT_BITS:,}")


def _checked_int(value: Any) -> Any:
    if type(value) is int:
        _check_bits(value.bit_length())
    return value


def _text_size(value: Any) -> int:
    """About how long str(value) is, without building it; counting stops past MAX_ITEMS.

    An object shared a thousand times in a list counts a thousand times, as repr() prints it.
    """
    size = 0
    pending = [value]
    while pending and size <= MAX_ITEMS:
        item = pending.pop()
        if isinstance(item, str | bytes):
            size += len(item)
        elif isinstance(item, list | tuple | set | frozenset):
            size += 2 + 2 * len(item)
            pending.extend(item)
        elif isinstance(item, dict):
            size += 2 + 4 * len(item)
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 2
        else:
            size += 24
    return size


def _check_text(value: Any) -> None:
    if type(value) is not str:
        _check_items(_text_size(value))


# Operators: the policy turns ``a + b`` into ``_add_(a, b)`` and so on, ``x += y`` into ``_inplacevar_``.


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        _check_items(len(a) + len(b))
    return _checked_int(a + b)


def _iadd(a: Any, b: Any) -> Any:
    if isinstance(a, list) and not isinstance(b, Sized):
        b = list(b)
    if isinstance(a, _SEQUENCES) and isinstance(b, Sized):
        _check_items(len(a) + len(b))
    return _checked_int(operator.iadd(a, b))


def _sub(a: Any, b: Any) -> Any:
    return _checked_int(a - b)


def _isub(a: Any, b: Any) -> Any:
    return _checked_int(operator.isub(a, b))


def _check_product(a: Any, b: Any) -> None:
    if isinstance(a, int) and isinstance(b, int):
        _check_bits(a.bit_length() + b.bit_length())
    elif isinstance(a, _SEQUENCES) and isinstance(b, int):
        _check_items(len(a) * b)
    elif isinstance(b, _SEQUENCES) and isinstance(a, int):
        _check_items(len(b) * a)


def _mul(a: Any, b: Any) -> Any:
    _check_product(a, b)
    return a * b


def _imul(a: Any, b: Any) -> Any:
    _check_product(a, b)
    return operator.imul(a, b)


def _pow(base: Any, exp: Any, mod: Any = None) -> Any:
    if mod is None and isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        # Any base past ±1 gives at least ``exp`` bits; the float estimate is only needed below that.
        _check_bits(exp if exp > MAX_INT_BITS else exp * math.log2(abs(base)))
    return pow(base, exp) if mod is None else pow(base, exp, mod)


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a:
        _check_bits(a.bit_length() + b)
    return a << b


_PERCENT_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.)", re.DOTALL)


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes):
        template = a.decode("latin-1") if isinstance(a, bytes) else a
        conversions = 0
        size = len(template)
        for width, precision, conversion in _PERCENT_CONVERSION.findall(template):
            if conversion == "%":
                continue
            if "*" in (width, precision):
                raise _LimitError("'*' widths aren't supported in % formatting")
            conversions += 1
            size += int(width or 0) + int(precision or 0)
        # A tuple's items are used once each; a dict or single value can be used by every conversion.
        _check_items(size + _text_size(b) * (1 if isinstance(b, tuple) else conversions))
    return a % b


_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": _iadd,
    "-=": _isub,
    "*=": _imul,
    "**=": _pow,
    "<<=": _lshift,
    "%=": _mod,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    ">>=": operator.irshift,
    "|=": operator.ior,
    "^=": operator.ixor,
    "&=": operator.iand,
    "@=": operator.imatmul,
}


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    return _INPLACE_OPERATORS[op](target, value)


# f-strings: each ``{value!conversion:spec}`` becomes ``_format_(...)``, the whole string ``_fstring_(...)``.

_CONVERSIONS: dict[int, Callable[[Any], str]] = {ord("s"): str, ord("r"): repr, ord("a"): ascii}
_NUMBERS_IN_SPEC = re.compile(r"\d+")


def _format_value(value: Any, conversion: int, spec: str) -> str:
    if type(value) is str and conversion < 0 and not spec:
        return value
    _check_text(value)
    if conversion in _CONVERSIONS:
        value = _CONVERSIONS[conversion](value)
    for number in _NUMBERS_IN_SPEC.findall(spec):
        _check_items(int(number))
    return format(value, spec)


def _join_fstring(*parts: str) -> str:
    _check_items(sum(map(len, parts)))
    return "".join(parts)


# ``[a, *b]`` (and tuple and set displays with a star) becomes ``_display_("list", (a,), b)``.

_DISPLAYS: dict[str, Callable[[Any], Any]] = {"list": list, "tuple": tuple, "set": set}


def _display(kind: str, *parts: Any) -> Any:
    parts = tuple(part if isinstance(part, Sized) else list(part) for part in parts)
    _check_items(sum(map(len, parts)))
    return _DISPLAYS[kind](itertools.chain.from_iterable(parts))


# Methods of str, bytes and list that can build a far bigger result than their inputs.


def _padding(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Any, width: Any, *args: Any) -> Any:
        if isinstance(width, int):
            _check_items(width)
        return method(self, width, *args)

    return checked


def _replacing(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Any, old: Any, new: Any, count: Any = -1) -> Any:
        if isinstance(old, str | bytes) and isinstance(new, str | bytes) and isinstance(count, int):
            hits = self.count(old) if old else len(self) + 1
            if count >= 0:
                hits = min(hits, count)
            _check_items(len(self) + hits * (len(new) - len(old)))
        return method(self, old, new, count)

    return checked


def _joining(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Any, iterable: Any) -> Any:
        items = list(iterable)
        text = sum(len(item) for item in items if isinstance(item, str | bytes))
        _check_items(text + len(self) * max(len(items) - 1, 0))
        return method(self, items)

    return checked


def _translating(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Any, table: Any) -> Any:
        replacements = table.values() if isinstance(table, dict) else table if isinstance(table, list | tuple) else ()
        longest = max((len(text) for text in replacements if isinstance(text, str)), default=1)
        _check_items(len(self) * longest)
        return method(self, table)

    return checked


def _extending(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Any, iterable: Any) -> Any:
        items = iterable if isinstance(iterable, Sized) else list(iterable)
        _check_items(len(self) + len(items))
        return method(self, items)

    return checked


def _result_checked(method: Callable[..., Any]) -> Callable[..., Any]:
    """For methods that grow their input by a bounded factor, but could be chained to grow without end."""

    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        _check_items(len(result))
        return result

    return checked


_METHOD_CHECKS: dict[tuple[type, str], Callable[..., Any]] = {
    **{
        (kind, name): _padding(getattr(kind, name))
        for kind in (str, bytes)
        for name in ("ljust", "rjust", "center", "zfill")
    },
    **{(kind, "replace"): _replacing(kind.replace) for kind in (str, bytes)},
    **{(kind, "join"): _joining(kind.join) for kind in (str, bytes)},
    (str, "translate"): _translating(str.translate),
    (str, "encode"): _result_checked(str.encode),
    (bytes, "hex"): _result_checked(bytes.hex),
    (list, "extend"): _extending(list.extend),
}
_SIZE_CHECKED_TYPES = (str, bytes, list)


class _CheckedType:
    """Stands in for a builtin type: calling it is size-checked; isinstance() and its methods work as usual."""

    __slots__ = ("_call", "_real")

    def __init__(self, real: type, call: Callable[..., Any]) -> None:
        self._real = real
        self._call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._real)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._real, name)

    def __repr__(self) -> str:
        return repr(self._real)


# Called through the type (``dict.update(issue, ...)``) these would skip the write guard and the
# overrides of dict subclasses such as ScriptObject, so they go to the object's own method instead.
_MUTATORS: dict[type, frozenset[str]] = {
    dict: frozenset({"clear", "pop", "popitem", "setdefault", "update"}),
    list: frozenset({"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"}),
    set: frozenset(
        {
            *("add", "clear", "discard", "pop", "remove", "update"),
            *("difference_update", "intersection_update", "symmetric_difference_update"),
        }
    ),
}


def _call_mutator(name: str, target: Any, *args: Any, **kwargs: Any) -> Any:
    _check_writable(target)
    return _guarded_getattr(target, name)(*args, **kwargs)


def _guarded_method(obj: Any, name: str, method: Any) -> Any:
    if isinstance(obj, (type, _CheckedType)):
        receiver = obj._real if isinstance(obj, _CheckedType) else obj
        if name in _MUTATORS.get(receiver, ()):
            return functools.partial(_call_mutator, name)
        return _METHOD_CHECKS.get((receiver, name), method)
    kind = type(obj)
    if kind not in _SIZE_CHECKED_TYPES:
        kind = next((base for base in _SIZE_CHECKED_TYPES if isinstance(obj, base)), kind)
    checked = _METHOD_CHECKS.get((kind, name))
    return method if checked is None else types.MethodType(checked, obj)


_GUARDED_METHOD_NAMES = frozenset(name for _, name in _METHOD_CHECKS).union(*_MUTATORS.values())


# Attribute reads and writes.

# Besides RestrictedPython's frame and code attributes: str.format's attribute walks, the class
# tree, tab expansion and int <-> bytes conversions of any size.
_BLOCKED_ATTRIBUTES = INSPECT_ATTRIBUTES | {"format", "format_map", "mro", "expandtabs", "to_bytes", "from_bytes"}


def _guarded_getattr(obj: Any, name: str) -> Any:
    if type(name) is not str:
        raise TypeError("attribute names must be text")
    if name[:1] == "_" or name in _BLOCKED_ATTRIBUTES:
        raise AttributeError(f"scripts can't use the attribute '{name}'")
    # Exceptions raised by the caller's code can carry its objects (AttributeError.obj, ...).
    if isinstance(obj, BaseException) and name != "args":
        raise AttributeError(f"scripts can only read an error's 'args' (or use str(error)), not '{name}'")
    value = getattr(obj, name)
    return _guarded_method(obj, name, value) if name in _GUARDED_METHOD_NAMES else value


def _getattr_builtin(obj: Any, name: str, *default: Any) -> Any:
    # The policy's ``_getattr_`` never passes a default; keeping it out of there saves time per attribute.
    try:
        return _guarded_getattr(obj, name)
    except AttributeError:
        if default:
            return default[0]
        raise


def _guarded_hasattr(obj: Any, name: str) -> bool:
    try:
        _guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


class _ListWriter:
    """What ``items[i] = value`` writes through: assigning to a slice can grow the list."""

    __slots__ = ("_items",)

    def __init__(self, items: list) -> None:
        self._items = items

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, slice):
            value = value if isinstance(value, Sized) else list(value)
            _check_items(len(self._items) + len(value))
        self._items[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._items[key]


def _check_writable(obj: Any) -> None:
    # Exact types: a dict or list subclass handed in (a read-only view) stays read-only.
    if not (type(obj) in (dict, list, set) or isinstance(obj, ScriptObject)):
        raise TypeError(f"{type(obj).__name__} objects are read-only in scripts")


def _guarded_write(obj: Any) -> Any:
    _check_writable(obj)
    return _ListWriter(obj) if type(obj) is list else obj


def _apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


# Builtins.


def _int(*args: Any, **kwargs: Any) -> int:
    return _checked_int(int(*args, **kwargs))


def _str(*args: Any, **kwargs: Any) -> str:
    if args:
        _check_text(args[0])
    return str(*args, **kwargs)


def _repr(value: Any) -> str:
    _check_text(value)
    return repr(value)


def _range(*args: Any) -> range:
    numbers = range(*args)
    try:
        too_many = len(numbers) > MAX_ITEMS
    except OverflowError:
        too_many = True
    if too_many:
        raise _LimitError(f"range() is limited to {MAX_ITEMS:,} numbers")
    return numbers


def _round(number: Any, ndigits: Any = None) -> Any:
    # Rounding an int to -n digits computes 10 ** n.
    if isinstance(number, int) and isinstance(ndigits, int) and ndigits < 0:
        _check_bits(-ndigits * 10 // 3)
    return round(number, ndigits)


def _sum(iterable: Any, /, start: Any = 0) -> Any:
    if not isinstance(start, int | float):
        raise TypeError("sum() adds numbers; join lists with + or extend()")
    return sum(iterable, start)


_BUILTINS: dict[str, Any] = {
    **{
        name: getattr(builtins, name)
        for name in (
            # Functions and types that neither reach outside nor build much more than they are given.
            *("abs", "all", "any", "bin", "bool", "callable", "chr", "dict", "divmod", "enumerate", "filter"),
            *("float", "frozenset", "hex", "isinstance", "len", "list", "map", "max", "min", "next", "oct"),
            *("ord", "reversed", "set", "sorted", "tuple", "zip"),
            # Exceptions to raise and catch; BaseException and its non-Exception kin stay out.
            *("ArithmeticError", "AssertionError", "AttributeError", "Exception", "IndexError", "KeyError"),
            *("LookupError", "NameError", "NotImplementedError", "OverflowError", "RecursionError"),
            *("RuntimeError", "StopIteration", "TypeError", "UnicodeError", "ValueError", "ZeroDivisionError"),
        )
    },
    "getattr": _getattr_builtin,
    "hasattr": _guarded_hasattr,
    "int": _CheckedType(int, _int),
    "pow": _pow,
    "range": _range,
    "repr": _repr,
    "round": _round,
    "str": _CheckedType(str, _str),
    "sum": _sum,
}

_SCOPE: dict[str, Any] = {
    "__builtins__": _BUILTINS,
    "_getattr_": _guarded_getattr,
    "_getitem_": operator.getitem,
    "_getiter_": iter,
    "_write_": _guarded_write,
    "_inplacevar_": _inplacevar,
    "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
    "_unpack_sequence_": guarded_unpack_sequence,
    "_apply_": _apply,
    "_add_": _add,
    "_sub_": _sub,
    "_mul_": _mul,
    "_pow_": _pow,
    "_lshift_": _lshift,
    "_mod_": _mod,
    "_format_": _format_value,
    "_fstring_": _join_fstring,
    "_display_": _display,
}


# Debug output.


class DebugLog:
    """What a script printed, through print() or helpers.debug; text past ``max_chars`` is dropped."""

    def __init__(self, max_chars: int = MAX_DEBUG_CHARS) -> None:
        self._parts: list[str] = []
        self._room = max_chars
        self.truncated = False

    def debug(self, *values: Any, sep: str = " ", end: str = "\n") -> None:
        """Writes like print(). Scripts call it, so the text's size is checked before it is built."""
        if not isinstance(sep, str) or not isinstance(end, str):
            raise TypeError("sep and end must be text")
        _check_items(sum(map(_text_size, values)) + len(sep) * max(len(values) - 1, 0) + len(end))
        text = sep.join(map(str, values)) + end
        if len(text) > self._room:
            text = text[: self._room]
            self.truncated = True
        self._room -= len(text)
        self._parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def lines(self) -> list[str]:
        lines = self.text.splitlines()
        if self.truncated:
            lines.append("[debug output truncated]")
        return lines


class _Printer:
    """RestrictedPython rewrites ``print(...)`` to ``_print._call_print(...)`` and ``printed`` to ``_print()``."""

    __slots__ = ("_log",)

    def __init__(self, log: DebugLog, getattr_guard: Any = None) -> None:
        # RestrictedPython hands over its _getattr_ for print(file=...), which scripts don't get.
        self._log = log

    def _call_print(self, *values: Any, sep: str = " ", end: str = "\n", **others: Any) -> None:
        if others:
            raise TypeError(f"print() in scripts takes sep and end only, not {', '.join(others)}")
        self._log.debug(*values, sep=sep, end=end)

    def __call__(self) -> str:
        return self._log.text


def _clock(time_limit: float) -> Callable[[], bool]:
    deadline = time.monotonic() + time_limit
    monotonic = time.monotonic

    def tick() -> bool:
        if monotonic() > deadline:
            raise _Timeout
        return True

    return tick


# Compiling.

_OPERATOR_GUARDS: dict[type[ast.operator], str] = {
    ast.Add: "_add_",
    ast.Sub: "_sub_",
    ast.Mult: "_mul_",
    ast.Pow: "_pow_",
    ast.LShift: "_lshift_",
    ast.Mod: "_mod_",
}


def _call(function: str, args: list[ast.expr], located: ast.AST) -> ast.Call:
    call = ast.Call(func=ast.Name(function, ast.Load()), args=args, keywords=[])
    copy_locations(call, located)
    return call


def _has_side_effects(node: ast.expr) -> bool:
    return any(isinstance(part, ast.Call | ast.NamedExpr | ast.Yield | ast.YieldFrom) for part in ast.walk(node))


def _add_ticks(tree: ast.Module) -> None:
    """Puts a ``_tick_()`` before every statement, into every lambda and every comprehension step."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list):
                ticked = []
                for statement in statements:
                    tick = ast.Expr(_call("_tick_", [], statement))
                    copy_locations(tick, statement)
                    ticked += [tick, statement]
                setattr(node, field, ticked)
        if isinstance(node, ast.Lambda):
            ticked_body = ast.BoolOp(ast.And(), [_call("_tick_", [], node.body), node.body])
            copy_locations(ticked_body, node.body)
            node.body = ticked_body
        elif isinstance(node, ast.comprehension):
            node.ifs.insert(0, _call("_tick_", [], node.iter))


class SandboxPolicy(RestrictingNodeTransformer):
    """RestrictedPython's rules, plus the rewrites the guards above rely on.

    No imports or classes; size-growing operators, f-strings and starred displays call the size
    guards; ``a.b += 1`` and ``a[k] += 1`` work on targets without calls; every statement, lambda
    and comprehension step ticks the clock.
    """

    def visit_Module(self, node: ast.Module) -> ast.AST:
        node = super().visit_Module(node)
        _add_ticks(node)
        return node

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.error(node, "import statements are not allowed; scripts get what they need as names")

    visit_ImportFrom = visit_Import

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.error(node, "class statements are not allowed")

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node = self.node_contents_visit(node)
        guard = _OPERATOR_GUARDS.get(type(node.op))
        return node if guard is None else _call(guard, [node.left, node.right], node)

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        target = node.target
        if not isinstance(target, ast.Attribute | ast.Subscript) or _has_side_effects(target):
            return super().visit_AugAssign(node)
        # ``a[k] += v`` -> ``_write_(a)[k] = _inplacevar_("+=", _getitem_(a, k), v)``: a and k are
        # evaluated twice, which is why targets with calls keep RestrictedPython's refusal.
        loaded = copy.deepcopy(target)
        loaded.ctx = ast.Load()
        current = self.visit(loaded)
        value = self.visit(node.value)
        store = self.visit(target)
        operation = _call("_inplacevar_", [ast.Constant(IOPERATOR_TO_STR[type(node.op)]), current, value], node)
        assign = ast.Assign(targets=[store], value=operation)
        copy_locations(assign, node)
        return assign

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        node = self.node_contents_visit(node)
        return _call("_fstring_", node.values, node)

    def visit_FormattedValue(self, node: ast.FormattedValue) -> ast.AST:
        node = self.node_contents_visit(node)
        spec = node.format_spec or ast.Constant("")
        return _call("_format_", [node.value, ast.Constant(node.conversion), spec], node)

    def visit_List(self, node: ast.List) -> ast.AST:
        return self._guard_starred(node, "list")

    def visit_Tuple(self, node: ast.Tuple) -> ast.AST:
        return self._guard_starred(node, "tuple")

    def visit_Set(self, node: ast.Set) -> ast.AST:
        return self._guard_starred(node, "set")

    def _guard_starred(self, node: ast.List | ast.Tuple | ast.Set, kind: str) -> ast.AST:
        node = self.node_contents_visit(node)
        loading = isinstance(getattr(node, "ctx", ast.Load()), ast.Load)
        if not loading or not any(isinstance(item, ast.Starred) for item in node.elts):
            return node
        parts = [item.value if isinstance(item, ast.Starred) else ast.Tuple([item], ast.Load()) for item in node.elts]
        return _call("_display_", [ast.Constant(kind), *parts], node)


@dataclass(frozen=True)
class CompiledScript:
    """A script ready for ``run_script``; ``name`` says which rules it is ("outgoing", "incoming")."""

    name: str
    source: str
    code: types.CodeType


def _filename(name: str) -> str:
    return f"<{name} rules>"


_POLICY_ERROR = re.compile(r"Line (\d+): (.*)", re.DOTALL)


def compile_script(source: str, name: str) -> CompiledScript:
    """Compiles ``source`` for ``run_script``; the same source and name give back the same object.

    Raises ScriptError (kind "syntax", or "limit" for a script over MAX_SOURCE_CHARS) naming the line.
    """
    return _compile(source, name)


@functools.lru_cache(maxsize=128)
def _compile(source: str, name: str) -> CompiledScript:
    if len(source) > MAX_SOURCE_CHARS:
        message = f"the script has {len(source):,} characters; the limit is {MAX_SOURCE_CHARS:,}"
        raise ScriptError(message, script=name, kind="limit")
    filename = _filename(name)
    try:
        tree = ast.parse(source, filename)
        result = compile_restricted_exec(tree, filename, policy=SandboxPolicy)
    except SyntaxError as error:
        raise ScriptError(
            f"{type(error).__name__}: {error.msg}", script=name, kind="syntax", line=error.lineno
        ) from None
    except (RecursionError, MemoryError):
        # The parser, the policy or the compiler ran out of stack.
        raise ScriptError("the script is nested too deeply to compile", script=name, kind="syntax") from None
    if result.errors:
        match = _POLICY_ERROR.match(result.errors[0])
        line, message = (int(match[1]), match[2]) if match else (None, result.errors[0])
        raise ScriptError(message, script=name, kind="syntax", line=line)
    return CompiledScript(name, source, result.code)


def check_script(source: str, name: str) -> ScriptError | None:
    """The error that keeps ``source`` from compiling, or None: for checking rules as they are saved."""
    try:
        compile_script(source, name)
    except ScriptError as error:
        return error
    return None


# Running.


def run_script(
    script: CompiledScript,
    names: Mapping[str, Any],
    *,
    time_limit: float = 2.0,
    max_output_bytes: int = 1_000_000,
    log: DebugLog | None = None,
    outputs: Collection[str] | None = None,
) -> list[str]:
    """Runs ``script`` with ``names`` as its globals; returns the lines it printed.

    Pass your own ``log`` to hand scripts ``log.debug`` as ``helpers.debug``. Writes reach dicts,
    lists, sets and ScriptObjects only, so other objects in ``names`` are read-only as long as
    they hand out immutable values or copies. Afterwards each output must be JSON-like and at
    most ``max_output_bytes`` long as JSON: the ScriptObjects among ``outputs`` (the names the
    caller takes back; by default every ScriptObject in ``names``). An input the script may
    write to but nobody reads afterwards needs no check.

    Raises ScriptError for whatever goes wrong in the script; StopSync passes through.
    """
    for key in names:
        if not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"{key!r} can't be the name of a script global")
    log = DebugLog() if log is None else log
    scope = {**_SCOPE, "_print_": functools.partial(_Printer, log), "_tick_": _clock(time_limit), **names}
    failure = None
    try:
        exec(script.code, scope)  # noqa: S102 -- compiled by SandboxPolicy, run with the guards above
    except StopSync:
        raise
    except (Exception, _Timeout) as error:
        failure = _runtime_error(script, error, time_limit)
    if failure is not None:
        # Raised outside the handler: the script's own chain, a thousand frames deep after a
        # recursion bomb, would otherwise stay alive with the error and fill every report of it.
        raise failure
    for key in names if outputs is None else outputs:
        if isinstance(names[key], ScriptObject):
            _check_output(script, key, names[key], max_output_bytes)
    return log.lines


def _runtime_error(script: CompiledScript, error: BaseException, time_limit: float) -> ScriptError:
    line = None
    filename = _filename(script.name)
    traceback = error.__traceback__
    while traceback is not None:
        # The innermost frame of the script itself, not of the guards or helpers it called.
        if traceback.tb_frame.f_code.co_filename == filename:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    if _timed_out(error):
        message = f"stopped after the time limit of {time_limit:g} s; is there an endless loop?"
        return ScriptError(message, script=script.name, kind="timeout", line=line)
    if isinstance(error, _LimitError):
        return ScriptError(str(error), script=script.name, kind="limit", line=line)
    message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    kind: ErrorKind = "limit" if isinstance(error, RecursionError | MemoryError) else "runtime"
    return ScriptError(message, script=script.name, kind=kind, line=line)


def _timed_out(error: BaseException | None) -> bool:
    # A handler like ``except Undefined:`` turns the timeout into another error; it is still the cause.
    while error is not None:
        if isinstance(error, _Timeout):
            return True
        error = error.__context__
    return False


def _check_output(script: CompiledScript, key: str, value: ScriptObject, max_output_bytes: int) -> None:
    try:
        size = output_size(value, limit=max_output_bytes, name=key)
    except TypeError as error:
        raise ScriptError(str(error), script=script.name, kind="runtime") from None
    if size > max_output_bytes:
        message = f"{key} is over the output limit of {max_output_bytes:,} bytes of JSON"
        raise ScriptError(message, script=script.name, kind="limit")
