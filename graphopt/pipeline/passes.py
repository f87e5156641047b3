"""Passes and their registry: the :class:`Pass` a registration makes, its :class:`Invocation`
in a pipeline, the :class:`PassContext` it runs with, and the ``PASSES``/``PRESETS`` registries.

A pass is a named transformation of a canonical ``fx.GraphModule`` with a declared contract::

    @graphopt.register_pass("fold-mul-one", contract=graphopt.Exact())
    def fold_mul_one(gm, ctx, *, keep_last: bool = False) -> int:
        '''Replace ``x * 1`` by ``x``.'''
        ...
        return rewrites

Contracts are :mod:`graphopt.pipeline.contracts`, options and their rules
:mod:`graphopt.pipeline.options`, pipeline strings and presets' expansion
:mod:`graphopt.pipeline.spec`.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx

from graphopt.errors import OptionError, PassDefinitionError, PipelineError
from graphopt.pipeline.contracts import Contract, Exact
from graphopt.pipeline.options import Option, _options_from_class, _options_from_function
from graphopt.registry import Registry

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


def available_passes() -> dict[str, Pass]:
    """Every registered pass by name (built-ins, plug-ins, and user registrations)."""
    return PASSES.items()


def available_presets() -> dict[str, str]:
    """Every preset by name, as its pipeline string."""
    return {name: preset.pipeline for name, preset in PRESETS.items().items()}


def get_pass(name: str) -> Pass:
    """The pass registered as ``name``; PipelineError with suggestions (passes and presets)."""
    return PASSES.get(name, also=list(PRESETS))
