"""Pass infrastructure: contracts, pass definitions, options, the registry and pipelines.

A pass is a named transformation of a canonical ``fx.GraphModule`` with a declared contract::

    @graphopt.register_pass("fold-mul-one", contract=graphopt.Exact())
    def fold_mul_one(gm, ctx, *, keep_last: bool = False) -> int:
        '''Replace ``x * 1`` by ``x``.'''
        ...
        return rewrites

Options are the keyword-only parameters of the function (or the dataclass fields of a class
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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from graphopt.errors import OptionError, PassDefinitionError, PipelineError
from graphopt.registry import Registry

# --------------------------------------------------------------------------- contracts


class Contract:
    """What equivalence a pass keeps between the graph before and after it."""

    lossy: bool = False

    def check(self, verdict) -> str | None:
        """Reason the verdict breaks the contract, or None if it holds."""
        raise NotImplementedError

    def tolerance(self, dtype: torch.dtype):
        from graphopt import verify

        return verify.Tolerance.for_dtype(dtype)

    @property
    def has_budget(self) -> bool:
        """Whether the contract bounds how far outputs may move (a lossy one may only keep shapes)."""
        return True

    def for_options(self, options: dict[str, Any]) -> "Contract":
        """The contract of one invocation, given its resolved options (see ``Lossy.budget_option``)."""
        return self


@dataclass(frozen=True)
class Exact(Contract):
    """Same outputs up to floating-point reassociation.

    ``rtol``/``atol`` override the per-dtype defaults of ``graphopt.verify.Tolerance.for_dtype``
    (the rule is ``|a - b| <= atol + rtol * max|ref|`` per output).
    """

    rtol: float | None = None
    atol: float | None = None

    def tolerance(self, dtype: torch.dtype):
        from graphopt import verify

        if self.rtol is None and self.atol is None:
            return None  # each output gets the default of its own dtype
        base = verify.Tolerance.for_dtype(dtype)
        return verify.Tolerance(
            rtol=base.rtol if self.rtol is None else self.rtol,
            atol=base.atol if self.atol is None else self.atol,
        )

    def check(self, verdict) -> str | None:
        return None if verdict.ok else (verdict.reason or "outputs differ beyond tolerance")

    def __str__(self) -> str:
        return "exact"


@dataclass(frozen=True)
class Lossy(Contract):
    """Outputs may change within a budget.

    ``min_sqnr_db``: signal-to-quantization-noise ratio of every output against the graph
    before the pass; ``max_rel_error``: max |a-b| / max|ref| per output. Unset figures are not
    checked. Shapes and dtypes must still match. With neither figure set the contract has no
    budget: the manager measures and reports the SQNR but accepts any value ("no budget").
    ``budget_option``: the name of a pass option that, when not None, sets ``min_sqnr_db`` for
    that invocation (``prune-channels{min_sqnr=20}``).
    """

    min_sqnr_db: float | None = 20.0
    max_rel_error: float | None = None
    budget_option: str | None = None
    lossy: bool = dataclasses.field(default=True, init=False)

    @property
    def has_budget(self) -> bool:
        return self.min_sqnr_db is not None or self.max_rel_error is not None

    def for_options(self, options: dict[str, Any]) -> "Lossy":
        value = options.get(self.budget_option) if self.budget_option else None
        return self if value is None else dataclasses.replace(self, min_sqnr_db=float(value))

    def tolerance(self, dtype: torch.dtype):
        from graphopt import verify

        return verify.Tolerance(rtol=math.inf, atol=math.inf)

    def check(self, verdict) -> str | None:
        if not verdict.ok:  # with an infinite tolerance only shape, NaN/inf or crashes fail
            return verdict.reason
        for out in verdict.outputs:
            if self.min_sqnr_db is not None and out.sqnr_db < self.min_sqnr_db:
                return f"output {out.index}: SQNR {out.sqnr_db:.1f} dB < budget {self.min_sqnr_db} dB"
            if self.max_rel_error is not None and out.max_rel > self.max_rel_error:
                return f"output {out.index}: relative error {out.max_rel:.3g} > budget {self.max_rel_error}"
        return None

    def __str__(self) -> str:
        parts = []
        if self.min_sqnr_db is not None:
            parts.append(f"sqnr>={self.min_sqnr_db:g}dB")
        if self.max_rel_error is not None:
            parts.append(f"rel<={self.max_rel_error:g}")
        return "lossy(" + (",".join(parts) or "no budget") + ")"


# --------------------------------------------------------------------------- options


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


# --------------------------------------------------------------------------- passes


@dataclass
class Pass:
    """A registered pass: a callable plus its name, contract, options and constraints."""

    name: str
    fn: Callable[..., int]
    contract: Contract
    options: dict[str, Option]
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    idempotent: bool = True
    doc: str = ""
    is_class: bool = False

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown names are errors with suggestions."""
        out = {n: o.default for n, o in self.options.items()}
        for key, value in given.items():
            if key not in self.options:
                hint = difflib.get_close_matches(key, list(self.options), n=1)
                known = ", ".join(self.options) or "none"
                raise OptionError(
                    f"pass {self.name!r} has no option {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" (its options: {known})"
                )
            option = self.options[key]
            out[key] = option.validate(option.coerce(value, self.name), self.name)
        return out

    def __call__(self, gm: fx.GraphModule, ctx: "PassContext") -> int:
        options = ctx.options
        if self.is_class:
            result = self.fn(**options).run(gm, ctx)
        else:
            result = self.fn(gm, ctx, **options)
        return int(result or 0)


@dataclass
class Invocation:
    """One element of a pipeline: a pass with its options."""

    pass_: Pass
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pass_.name

    @property
    def contract(self) -> Contract:
        """The pass's contract under these options (a budget option may set its figure)."""
        return self.pass_.contract.for_options(self.options)

    def __str__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != self.pass_.options[k].default}
        if not changed:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in changed.items()) + "}"


class RewriteBudget:
    """Counts rewrites across a whole pipeline run; limits them for bisection."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.granted: list[tuple[str, str]] = []  # (pass name, description)

    def take(self, pass_name: str, where: str) -> bool:
        if self.limit is not None and len(self.granted) >= self.limit:
            return False
        self.granted.append((pass_name, where))
        return True


@dataclass
class PassContext:
    """What a pass sees besides the graph: options, inputs, budget, and a place to report."""

    pass_name: str
    options: dict[str, Any]
    example_inputs: tuple[Any, ...]
    calibration_data: Iterable[Any] | None = None
    budget: RewriteBudget = field(default_factory=RewriteBudget)
    declines: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)
    rewrites_granted: int = 0

    def may_rewrite(self, where: str = "") -> bool:
        """Ask before each rewrite; False means skip it (the budget used by bisection ran out)."""
        if self.budget.take(self.pass_name, where):
            self.rewrites_granted += 1
            return True
        return False

    def decline(self, node: fx.Node | str, reason: str) -> None:
        """Record why a candidate at ``node`` was not rewritten (shown in the report)."""
        self.declines.append((node.name if isinstance(node, fx.Node) else str(node), reason))

    def note(self, message: str) -> None:
        self.notes.append(message)

    def record(self, key: str, value: Any) -> None:
        self.figures[key] = value


# --------------------------------------------------------------------------- registry

ENTRY_POINT_GROUP = "graphopt.passes"


@dataclass(frozen=True)
class Preset:
    """A named pipeline string. ``inference``: its passes assume an inference-mode model."""

    pipeline: str
    inference: bool = False


# passes and presets come from the same places: the built-in passes package registers both, and
# a plug-in's module registers what it defines when its entry point is loaded
PASSES: Registry[Pass] = Registry("pass", builtins="graphopt.passes", group=ENTRY_POINT_GROUP,
                                  error=PipelineError, listed_by="graphopt passes")
PRESETS: Registry[Preset] = Registry("preset", builtins=None, group=None, filled_by=PASSES,
                                     error=PipelineError, listed_by="graphopt passes")


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


def register_pass(
    name: str,
    *,
    contract: Contract | None = None,
    after: Sequence[str] = (),
    before: Sequence[str] = (),
    idempotent: bool = True,
    replace: bool = False,
):
    """Decorator registering a function ``fn(gm, ctx, *, **options) -> int`` or a dataclass with
    ``run(self, gm, ctx) -> int`` as pass ``name``.

    ``after``/``before`` declare ordering constraints checked against every pipeline.
    ``idempotent=True`` says a second run finds nothing left to do.
    """
    PASSES.check_name(name)

    def decorate(obj):
        is_class = inspect.isclass(obj)
        if is_class and not hasattr(obj, "run"):
            raise PassDefinitionError(f"class pass {obj.__name__} needs a run(self, gm, ctx) method returning the number of rewrites")
        opts = _options_from_class(obj) if is_class else _options_from_function(obj)
        PASSES.add(name, Pass(
            name=name,
            fn=obj,
            contract=contract or Exact(),
            options=opts,
            after=tuple(after),
            before=tuple(before),
            idempotent=idempotent,
            doc=inspect.getdoc(obj) or "",
            is_class=is_class,
        ), replace=replace, same=lambda a, b: a.fn is b.fn, where=lambda p: p.fn.__module__)
        return obj

    return decorate


def unregister_pass(name: str) -> None:
    """Forget the pass registered as ``name`` (no error if there is none)."""
    PASSES.remove(name)


def register_preset(name: str, pipeline: str, *, inference: bool = False) -> None:
    """Name a pipeline string so it can be used wherever a pass name can.

    ``inference=True``: the preset's passes assume an inference-mode model; the PassManager
    refuses a model in training mode (TrainingModeError) before running it."""
    if not isinstance(pipeline, str):
        raise PipelineError(f"preset {name!r}: the pipeline must be a string such as 'a,b{{x=1}}', not {pipeline!r}")
    PRESETS.add(name, Preset(pipeline, inference), replace=True)


def inference_presets(spec: Any) -> list[str]:
    """Presets meant for inference that a pipeline spec names, directly or nested in presets."""
    found: list[str] = []

    def walk(item: Any, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(item, (list, tuple)):
            for x in item:
                walk(x, depth)
        elif isinstance(item, str):
            try:
                names = [name for name, _ in parse_pipeline_string(item)]
            except PipelineError:
                return
            for name in names:
                preset = PRESETS.peek(name) if name in PRESETS and name not in PASSES else None
                if preset is not None:
                    if preset.inference and name not in found:
                        found.append(name)
                    walk(preset.pipeline, depth + 1)

    walk(spec, 0)
    return found


def available_passes() -> dict[str, Pass]:
    """Every registered pass by name (built-ins, plug-ins, and user registrations)."""
    return PASSES.items()


def available_presets() -> dict[str, str]:
    """Every preset by name, as its pipeline string."""
    return {name: preset.pipeline for name, preset in PRESETS.items().items()}


def get_pass(name: str) -> Pass:
    """The pass registered as ``name``; PipelineError with suggestions (passes and presets)."""
    return PASSES.get(name, also=list(PRESETS))


# --------------------------------------------------------------------------- pipelines

_ITEM = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline_string(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b{x=1,y=two},c"`` -> ``[("a", {}), ("b", {"x": "1", "y": "two"}), ("c", {})]``."""
    items: list[tuple[str, dict[str, str]]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(
                f"cannot parse pipeline {text!r} at column {pos}: {text[pos:pos + 20]!r}; "
                "expected name or name{option=value,...} separated by commas"
            )
        opts: dict[str, str] = {}
        if m.group(2):
            for part in _split_options(m.group(2)):
                if "=" not in part:
                    raise PipelineError(f"option {part!r} of {m.group(1)!r} needs the form name=value")
                k, v = part.split("=", 1)
                opts[k.strip().replace("-", "_")] = v.strip()
        items.append((m.group(1), opts))
        pos = m.end()
    if not items:
        raise PipelineError("empty pipeline: name at least one pass or preset")
    return items


def _split_options(body: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def build_pipeline(spec: Any, overrides: dict[str, dict[str, Any]] | None = None) -> list[Invocation]:
    """Resolve a pipeline spec into invocations; every name and option is checked here,
    before anything runs. ``overrides`` maps pass name -> options set from Python."""
    invocations: list[Invocation] = []
    _expand(spec, invocations, depth=0)
    for name in overrides or {}:
        if not any(inv.name == name for inv in invocations):
            raise PipelineError(f"options given for pass {name!r}, which is not in the pipeline")
    for inv in invocations:
        extra = (overrides or {}).get(inv.name, {})
        inv.options = inv.pass_.resolve_options({**inv.options, **extra})
    check_ordering(invocations)
    return invocations


def _expand(spec: Any, out: list[Invocation], depth: int) -> None:
    if depth > 8:
        raise PipelineError("presets nest more than 8 deep; is a preset referring to itself?")
    if isinstance(spec, str):
        for name, opts in parse_pipeline_string(spec):
            if name in PRESETS and name not in PASSES:
                if opts:
                    raise PipelineError(f"preset {name!r} takes no options; set them on its passes")
                _expand(PRESETS.get(name).pipeline, out, depth + 1)
            else:
                p = get_pass(name)
                p.resolve_options(opts)  # unknown options fail here, before anything runs
                out.append(Invocation(p, dict(opts)))
        return
    if isinstance(spec, Invocation):
        out.append(Invocation(spec.pass_, dict(spec.options)))
        return
    if isinstance(spec, Pass):
        out.append(Invocation(spec, {}))
        return
    if callable(spec) and not isinstance(spec, (list, tuple)):
        for p in PASSES.items().values():
            if p.fn is spec:
                out.append(Invocation(p, {}))
                return
        name = getattr(spec, "__name__", "anonymous").replace("_", "-").lower()
        adhoc = Pass(name=f"{name}", fn=spec, contract=Exact(), options=_options_from_function(spec),
                     doc=inspect.getdoc(spec) or "")
        out.append(Invocation(adhoc, {}))
        return
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise PipelineError("empty pipeline: name at least one pass or preset")
        for item in spec:
            _expand(item, out, depth)
        return
    raise PipelineError(f"cannot build a pipeline from {type(spec).__name__}: use a string, a pass or a list")


def check_ordering(invocations: list[Invocation]) -> None:
    """Raise PipelineError listing every declared ordering constraint the pipeline breaks.

    Constraints are never fixed by reordering: the user's order is what runs.
    """
    import networkx as nx

    position: dict[str, list[int]] = {}
    for i, inv in enumerate(invocations):
        position.setdefault(inv.name, []).append(i)
    g = nx.DiGraph()
    for inv in invocations:
        for earlier in inv.pass_.after:
            g.add_edge(earlier, inv.name)
        for later in inv.pass_.before:
            g.add_edge(inv.name, later)
    problems = []
    try:
        cycle = nx.find_cycle(g)
        problems.append("declared constraints form a cycle: " + " -> ".join(a for a, _ in cycle))
    except nx.NetworkXNoCycle:
        pass
    for a, b in g.edges:
        if a in position and b in position and min(position[b]) < min(position[a]):
            problems.append(f"{b!r} (step {min(position[b]) + 1}) must run after {a!r} (step {min(position[a]) + 1})")
    if problems:
        raise PipelineError(
            "pipeline order breaks declared constraints: " + "; ".join(problems)
            + ". Reorder the pipeline (graphopt never reorders it for you)."
        )
