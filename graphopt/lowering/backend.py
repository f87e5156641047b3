"""The backend protocol and registry: :class:`Backend` (a backend's options and the calls
:func:`graphopt.lowering.lower` makes of it), :class:`Requires`, and the ``BACKENDS`` registry
with :func:`register_backend`, :func:`get_backend` and the entry-point plug-ins."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch.fx as fx

from graphopt.errors import LoweringError, UnknownBackendError
from graphopt.registry import Registry

if TYPE_CHECKING:
    from graphopt.verify import Tolerance

ENTRY_POINT_GROUP = "graphopt.backends"


@dataclass(frozen=True)
class Requires:
    """A pass a backend needs run before it lowers a graph.

    ``pending(gm)`` says why ``gm`` still needs the pass (None: it does not); :func:`lower`
    raises :class:`LoweringError` naming the pass and the reason. A backend states what it
    needs; it does not run passes of its choosing behind the user's pipeline.
    """

    pass_name: str
    pending: Callable[[fx.GraphModule], str | None]
    why: str = ""


class Backend:
    """Base class of lowering backends.

    Subclasses are dataclasses: their fields are the options :func:`lower` accepts as keyword
    arguments (validate values in ``__post_init__`` and raise :class:`LoweringError`). One
    instance serves one call of :func:`lower`, so it may keep state between the calls below.
    The class docstring's first line is what ``graphopt backends`` shows.
    """

    #: registry name, set by :func:`register_backend`
    name: ClassVar[str] = ""
    #: file suffix :func:`lower` appends to a ``path`` that has none
    suffix: ClassVar[str] = ""
    #: passes the graph must have been through (checked by :func:`lower`, see :class:`Requires`)
    requires: ClassVar[tuple[Requires, ...]] = ()
    #: what runs the file, for messages ("ONNX Runtime")
    runtime: ClassVar[str] = "the backend's runtime"
    #: what to tell the user whose graph holds nodes this backend cannot take
    unsupported_advice: ClassVar[str] = (
        "rewrite these nodes with operations the backend supports, or lower with another backend"
    )

    def export(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
        """Write ``gm`` to ``path`` (a staged path; side files may be written next to it).

        Record what happened in ``report`` (which exporter, fallbacks and why, op counts). The
        graph module must not be modified. Any exception means the export failed: :func:`lower`
        turns it into a :class:`LoweringError` naming the nodes :meth:`probe` rejects.
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement export()")

    def load(self, path: Path, report: dict[str, Any]) -> Callable[..., Any]:
        """Load ``path`` in the backend's runtime; return a callable taking the example inputs
        positionally and returning tensors or numpy arrays (nested in tuples/lists/dicts)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement load()")

    def verification_inputs(self, example_inputs: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
        """``(label, inputs)`` sets the loaded artifact must match the graph on (each one is
        also varied by :func:`graphopt.verify.compare`). Override to check more, e.g. another
        batch size for a file exported with a dynamic batch dimension."""
        return [("example inputs", example_inputs)]

    def default_tolerance(self, gm: fx.GraphModule) -> Tolerance | None:
        """The tolerance :func:`lower` verifies with when the caller gave none; None means the
        per-dtype default. Override where the runtime legitimately computes differently from
        the graph, e.g. a quantized graph run on the runtime's own int8 kernels."""
        return None

    def probe(self, module: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
        """Why this backend cannot take ``module``, a graph of one node of the lowered graph
        fed with that node's example values, or None when it can. The default cannot tell."""
        return None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run on this machine (an optional package missing, with the
        command that installs it), or None when it can. :func:`lower` raises
        :class:`LoweringError` with this reason; ``graphopt demo`` skips the backend and says why."""
        return None

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Option name -> default value."""
        return {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        } if dataclasses.is_dataclass(cls) else {}


BACKENDS: Registry[type[Backend]] = Registry(
    "backend", builtins="graphopt.backends", group=ENTRY_POINT_GROUP, error=LoweringError,
    unknown_error=UnknownBackendError, listed_by="graphopt backends",
    adopt=lambda name, obj: _adopt_plugin(name, obj),
)


def _adopt_plugin(name: str, obj: object) -> None:
    """An entry point naming a Backend class registers it under the entry point's name, unless
    its module's decorator registered it already."""
    if inspect.isclass(obj) and issubclass(obj, Backend) and obj not in BACKENDS.items_now().values():
        register_backend(name)(obj)


def register_backend(name: str, *, replace: bool = False) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator registering a :class:`Backend` subclass under ``name`` (kebab-case)."""
    BACKENDS.check_name(name)

    def decorate(cls: type[Backend]) -> type[Backend]:
        if not (inspect.isclass(cls) and issubclass(cls, Backend)):
            raise LoweringError(f"@register_backend({name!r}) decorates a subclass of graphopt.Backend, not {cls!r}")
        if dataclasses.is_dataclass(cls):
            required = [f.name for f in dataclasses.fields(cls)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if required:
                raise LoweringError(f"backend {name!r}: every option needs a default value; {required} have none")
        BACKENDS.add(name, cls, replace=replace, same=lambda a, b: a.__qualname__ == b.__qualname__,
                     where=lambda c: f"{c.__module__}.{c.__qualname__}")
        cls.name = name
        return cls

    return decorate


def unregister_backend(name: str) -> None:
    """Forget the backend registered as ``name`` (no error if there is none)."""
    BACKENDS.remove(name)


def available_backends() -> dict[str, type[Backend]]:
    """Every registered backend class by name: built-ins, plug-ins and user registrations."""
    return BACKENDS.items()


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``; :class:`UnknownBackendError` with suggestions."""
    return BACKENDS.get(name)


def _instantiate(cls: type[Backend], options: dict[str, Any]) -> Backend:
    known = cls.options()
    unknown = [key for key in options if key not in known]
    if unknown:
        key = unknown[0]
        hints = difflib.get_close_matches(key, list(known), n=1)
        raise LoweringError(
            f"backend {cls.name!r} has no option {key!r}"
            + (f"; did you mean {hints[0]!r}?" if hints else "")
            + f" Its options: {', '.join(f'{k}={v!r}' for k, v in known.items()) or 'none'}."
        )
    return cls(**options)
