"""Discovery of third-party passes and backends through Python entry points."""
from __future__ import annotations

from importlib import metadata
from typing import Any, Iterator


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
