"""One registry policy for passes, presets and backends.

Each kind of thing graphopt looks up by name lives in a :class:`Registry`. A registry fills
itself on first use, in one way for every kind:

1. it imports its package of built-ins, whose modules register themselves; if a built-in fails
   to import, the error propagates and discovery is retried on the next lookup, so a registry is
   never silently missing the built-ins after the broken one;
2. it loads the entry points of its group; a plug-in that fails to load is remembered (a lookup
   of that name says why it is missing) and warned about once, and never takes graphopt or the
   other plug-ins down. An entry point may name a module (it registers what it defines when
   imported) or an object the registry accepts (registered under the entry point's name).

Names are kebab-case; registering a name that is taken by another object is an error unless
``replace=True``.
"""
from __future__ import annotations

import difflib
import importlib
import re
import warnings
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from graphopt.errors import GraphoptError

T = TypeVar("T")

NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def load_entry_points(group: str) -> Iterator[tuple[str, Any, str | None]]:
    """``(name, loaded object or None, error or None)`` for every entry point of ``group``.

    A plug-in that fails to import is reported, never raised: one broken distribution must not
    take graphopt or the other plug-ins down.
    """
    for ep in metadata.entry_points(group=group):
        try:
            yield ep.name, ep.load(), None
        except Exception as exc:
            yield ep.name, None, f"{ep.value}: {type(exc).__name__}: {exc}"


class Registry(Generic[T]):
    """Named entries of one kind: built-ins from a package, plug-ins from an entry-point group."""

    def __init__(
        self,
        kind: str,
        *,
        builtins: str | None,
        group: str | None,
        error: type[GraphoptError],
        unknown_error: type[GraphoptError] | None = None,
        adopt: Callable[[str, object], None] | None = None,
        listed_by: str = "",
        filled_by: "Registry | None" = None,
    ):
        self.kind = kind
        self.builtins = builtins
        self.group = group
        self.error = error
        self.unknown_error = unknown_error or error
        self.adopt = adopt  # registers an object an entry point loaded (a module registers itself)
        self.listed_by = listed_by
        self.filled_by = filled_by  # another registry whose discovery also fills this one
        self.plugin_errors: dict[str, str] = {}
        self._entries: dict[str, T] = {}
        self._discovered = False

    # -- registration ------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise self.error(f"{self.kind} name {name!r} must be kebab-case (lowercase words joined by '-')")

    def add(self, name: str, entry: T, *, replace: bool = False, same: Callable[[T, T], bool] | None = None,
            where: Callable[[T], str] = lambda e: "") -> None:
        """Register ``entry`` as ``name``. Re-registering the same object (``same``) is allowed,
        so a module imported twice does not fail."""
        self.check_name(name)
        known = self._entries.get(name)
        if known is not None and not replace and not (same or (lambda a, b: a is b))(known, entry):
            origin = where(known)
            raise self.error(
                f"a {self.kind} named {name!r} is already registered" + (f" ({origin})" if origin else "")
                + "; choose another name or pass replace=True"
            )
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    # -- lookup ------------------------------------------------------------------------------

    def discover(self) -> None:
        if self._discovered:
            return
        if self.filled_by is not None:
            self.filled_by.discover()
        if self.builtins:
            importlib.import_module(self.builtins)  # raises: the registry stays undiscovered
        self._discovered = True
        if not self.group:
            return
        for name, loaded, error in load_entry_points(self.group):
            if error is not None:
                self.plugin_errors[name] = error
                warnings.warn(f"graphopt: the {self.kind} plug-in {name!r} could not be loaded ({error})",
                              stacklevel=3)
            elif self.adopt is not None and name not in self._entries:
                self.adopt(name, loaded)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(sorted(self._entries))

    def items(self) -> dict[str, T]:
        self.discover()
        return dict(sorted(self._entries.items()))

    def items_now(self) -> dict[str, T]:
        """The entries registered so far, without discovery (for use during discovery)."""
        return dict(self._entries)

    def peek(self, name: str) -> T | None:
        """The entry, without discovery (for registration-time checks)."""
        return self._entries.get(name)

    def get(self, name: str, *, also: list[str] = ()) -> T:  # type: ignore[assignment]
        """The entry named ``name``, or the unknown-name error with suggestions (``also``: more
        names worth suggesting, such as presets beside passes)."""
        self.discover()
        if name in self._entries:
            return self._entries[name]
        if name in self.plugin_errors:
            raise self.unknown_error(
                f"the {self.kind} plug-in {name!r} failed to load ({self.plugin_errors[name]}); "
                "fix or reinstall the package that provides it"
            )
        hints = difflib.get_close_matches(str(name), [*self._entries, *also], n=3, cutoff=0.4)
        raise self.unknown_error(
            f"unknown {self.kind} {name!r}"
            + (f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else "")
            + (f" Available: {', '.join(sorted(self._entries)) or 'none'}" if not also else "")
            + (f" (`{self.listed_by}` lists them)." if self.listed_by else ".")
        )
