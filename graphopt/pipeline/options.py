"""Pass options: their declared rules and how values given as text or from Python become them.

Options are the keyword-only parameters of a pass function (or the dataclass fields of a class
pass with a ``run(self, gm, ctx)`` method); pipeline strings set them by name.

An option's annotation may carry the rules its values follow, as ``typing.Annotated``
metadata (:class:`Range`, :class:`OneOf`, :class:`Check`, and a string for its doc)::

    @graphopt.register_pass("thin-out")
    def thin_out(gm, ctx, *, ratio: Annotated[float, Range(ge=0, lt=1)] = 0.5,
                 mode: Annotated[str, OneOf(lambda: MODES)] = "fast") -> int: ...

Every value given for an option (pipeline string, ``options=`` from Python, the CLI) is checked
against its type and its rules when the pipeline is built, before any pass runs; a bad value is
an :class:`OptionError` naming the pass, the option, the value and what is allowed.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from graphopt.errors import OptionError, PassDefinitionError


class Constraint:
    """A rule the values of an option follow, declared in its annotation
    (``Annotated[int, Range(ge=1)]``) and checked when a pipeline is built.

    Subclasses say what is allowed (``allowed``: words completing "must be ...") and test a
    value (``accepts``); ``hint`` may add a suggestion to the error. ``None`` is never checked
    (whether an option may be None is its type's business).
    """

    def allowed(self) -> str:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def hint(self, value: Any) -> str:
        return ""


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range(Constraint):
    """Numbers within bounds: ``Range(ge=0, lt=1)`` is [0, 1), ``Range(ge=1)`` is >= 1.
    ``why`` (optional) says what the number means, for the error message."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None or self.le is not None and self.lt is not None:
            raise PassDefinitionError("Range: give at most one lower bound (ge or gt) and one upper bound (le or lt)")

    def allowed(self) -> str:
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            text = (f"in {'[' if self.ge is not None else '('}{_num(low)}, {_num(high)}"
                    f"{']' if self.le is not None else ')'}")
        elif low is not None:
            text = f"{'>=' if self.ge is not None else '>'} {_num(low)}"
        elif high is not None:
            text = f"{'<=' if self.le is not None else '<'} {_num(high)}"
        else:
            text = "a number"
        return text + (f" ({self.why})" if self.why else "")

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


@dataclass(frozen=True)
class OneOf(Constraint):
    """One of ``choices``: an iterable, or a function returning one (read at check time, so a
    registry that grows later, like quantization configs, is seen as it is then)."""

    choices: Iterable[Any] | Callable[[], Iterable[Any]]
    why: str = ""

    def values(self) -> list[Any]:
        return list(self.choices() if callable(self.choices) else self.choices)

    def allowed(self) -> str:
        return "one of " + ", ".join(map(str, self.values())) + (f" ({self.why})" if self.why else "")

    def accepts(self, value: Any) -> bool:
        try:
            return value in self.values()
        except TypeError:  # unhashable value against a mapping of choices
            return False

    def hint(self, value: Any) -> str:
        close = difflib.get_close_matches(str(value), [str(v) for v in self.values()], n=1)
        return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class Check(Constraint):
    """Any rule: ``predicate(value) -> bool``, described by ``description`` (completing "must
    be ..."). The predicate may instead raise OptionError with a more specific message."""

    predicate: Callable[[Any], bool]
    description: str

    def allowed(self) -> str:
        return self.description

    def accepts(self, value: Any) -> bool:
        return bool(self.predicate(value))


def check_patterns(pass_name: str, option: str, patterns: Iterable[str], names: Iterable[str],
                   *, match: Callable[[str, str], bool] | None = None, what: str = "layer") -> None:
    """Raise OptionError when one of ``patterns`` (glob patterns, ``fnmatch`` rules by default)
    matches none of ``names``; the message names the pattern and a few names that exist.

    For options naming parts of the graph (``skip=``, per-layer settings): a pattern that
    matches nothing is usually a typo, and silently doing nothing hides it. Call it at the
    start of the pass, where the graph is known.
    """
    import fnmatch

    match = match or fnmatch.fnmatchcase
    known = list(dict.fromkeys(n for n in names if n))
    for pattern in patterns:
        if any(match(n, pattern) for n in known):
            continue
        close = difflib.get_close_matches(pattern, known, n=3, cutoff=0.5)
        shown = close or known[:6]
        listing = ", ".join(map(repr, shown)) + (", ..." if not close and len(known) > len(shown) else "")
        raise OptionError(
            f"pass {pass_name!r}: option {option} pattern {pattern!r} matches no {what} of the graph; "
            + (f"did you mean one of {listing}?" if close else f"{what}s are named like: {listing or '(none)'}")
            + " (glob patterns: * matches anything, including dots)"
        )


@dataclass(frozen=True)
class Option:
    name: str
    type: Any
    default: Any
    doc: str = ""
    checks: tuple[Constraint, ...] = ()

    def parse(self, text: str, pass_name: str) -> Any:
        """Convert a pipeline-string value to the option's type."""
        return _convert(text, self.type, self.default, f"{pass_name}{{{self.name}=...}}")

    def coerce(self, value: Any, pass_name: str) -> Any:
        """Strings (from pipeline strings or the CLI) are parsed and checked against the type."""
        if isinstance(value, str) and self.type not in (str, Any):
            return self.parse(value, pass_name)
        return value

    def validate(self, value: Any, pass_name: str) -> Any:
        """Raise OptionError unless ``value`` (coerced) has the option's type and follows its rules."""
        if not _accepts(value, self.type):
            raise OptionError(
                f"pass {pass_name!r}: option {self.name} must be {_type_name(self.type)}, "
                f"got {value!r} ({type(value).__name__})"
            )
        if value is not None:
            for check in self.checks:
                if not check.accepts(value):
                    raise OptionError(
                        f"pass {pass_name!r}: option {self.name} must be {check.allowed()}, "
                        f"got {value!r}{check.hint(value)}"
                    )
        return value


_UNION_TYPES = (typing.Union, types.UnionType)


def _accepts(value: Any, tp: Any) -> bool:
    """Whether a Python value fits annotation ``tp`` (what cannot be checked is accepted)."""
    if tp is Any or tp is inspect.Parameter.empty or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _accepts(value, args[0])
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in _UNION_TYPES:
        return any(_accepts(value, a) for a in args)
    if origin is collections.abc.Callable or tp in (typing.Callable, collections.abc.Callable):
        return callable(value)
    if origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_accepts(v, a) for v, a in zip(value, args))
        return all(_accepts(v, args[0]) for v in value) if args else True
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, collections.abc.Mapping):
            return False
        key, val = args if len(args) == 2 else (Any, Any)
        return all(_accepts(k, key) and _accepts(v, val) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # type variables, forward references, protocols: not checked


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if tp is float:
        return "a number"
    if tp is int:
        return "an int"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and origin is None:
        return tp.__name__
    if origin in (tuple, list) and (len(args) == 1 or len(args) == 2 and args[1] is Ellipsis):
        plural = {str: "strings", int: "ints", float: "numbers", bool: "booleans"}.get(args[0])
        return f"a list of {plural}" if plural else f"a list of {_type_name(args[0])}"
    return re.sub(r"\b(?:[a-z_]\w*\.)+", "", str(tp))  # typing.Callable[[x.Y], ...] -> Callable[[Y], ...]


def _annotation(tp: Any) -> tuple[Any, tuple[Constraint, ...], str]:
    """Split ``Annotated[T, Range(...), "doc"]`` (also inside ``| None``) into T, rules, doc."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        base, checks, doc = _annotation(args[0])
        extra = tp.__metadata__
        checks += tuple(m for m in extra if isinstance(m, Constraint))
        doc = next((m for m in extra if isinstance(m, str)), doc)
        return base, checks, doc
    if origin in _UNION_TYPES and any(typing.get_origin(a) is typing.Annotated for a in args):
        parts = [_annotation(a) for a in args]
        base = typing.Union[tuple(p[0] for p in parts)]  # type: ignore[index]
        return base, tuple(c for p in parts for c in p[1]), next((p[2] for p in parts if p[2]), "")
    return tp, (), ""


def _convert(text: str, tp: Any, default: Any, where: str) -> Any:
    text = text.strip()
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        tp = type(default) if default is not None else str
        origin, args = None, ()
    if origin is typing.Literal:
        if text in [str(a) for a in args]:
            return next(a for a in args if str(a) == text)
        raise OptionError(f"{where}: {text!r} is not one of {', '.join(map(str, args))}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(text, a, default, where)
            except OptionError as e:
                errors.append(str(e))
        raise OptionError(errors[0] if errors else f"{where}: cannot parse {text!r}")
    if origin in (tuple, list) or tp in (tuple, list):
        inner = args[0] if args else str
        body = text[1:-1] if text[:1] in "[(" and text[-1:] in "])" else text
        items = [s for s in re.split(r"[;|]|,(?![^\[]*\])", body) if s.strip()] if body else []
        return tuple(_convert(s, inner, None, where) for s in items)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{where}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text) if tp is float or not re.fullmatch(r"-?\d+\.0*", text) else int(float(text))
        except ValueError:
            raise OptionError(f"{where}: expected {tp.__name__}, got {text!r}") from None
    if tp is str:
        return text.strip("'\"")
    raise OptionError(f"{where}: options of type {tp} cannot be set from a pipeline string; pass it from Python")


def _options_from_function(fn: Callable) -> dict[str, Option]:
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True) if fn.__annotations__ else {}
    opts = {}
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            if p.default is inspect.Parameter.empty:
                raise PassDefinitionError(f"option {p.name!r} of pass {fn.__name__} needs a default value, e.g. {p.name}: int = 0")
            tp, checks, doc = _annotation(hints.get(p.name, type(p.default)))
            opts[p.name] = Option(p.name, tp, p.default, doc, checks)
    return opts


def _options_from_class(cls: type) -> dict[str, Option]:
    if not dataclasses.is_dataclass(cls):
        raise PassDefinitionError(f"class pass {cls.__name__} must be a @dataclass (its fields are its options)")
    hints = typing.get_type_hints(cls, include_extras=True)
    opts = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            raise PassDefinitionError(f"option {f.name!r} of pass {cls.__name__} needs a default value")
        tp, checks, doc = _annotation(hints.get(f.name, type(default)))
        opts[f.name] = Option(f.name, tp, default, f.metadata.get("doc", doc), checks)
    return opts
