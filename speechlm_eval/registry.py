"""The one registry idiom: a table of ``name -> "module:object"`` rows resolved on first use (as lm-eval's model
mapping), so a model family, benchmark, scorer or TTS engine is one file plus one table row, and nothing has to be
imported (or remembered to be imported) before it can be found."""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")


def resolve(target: str) -> object:
    """The object a ``"package.module:attribute"`` string names (``ValueError`` for a malformed target)."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"registry target {target!r} must look like 'package.module:object'")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Names mapped to objects, or to ``"module:object"`` strings imported when the name is first asked for.

    Args:
        kind: what the entries are, for messages ("model family", "benchmark", ...).
        table: the built-in rows; more are added with :meth:`register`.
        unknown: builds the exception raised for a name that is not registered, from the name and the known names.
    """

    def __init__(self, kind: str, table: Mapping[str, str | T],
                 unknown: Callable[[str, list[str]], Exception] | None = None) -> None:
        self.kind = kind
        self._table: dict[str, str | T] = dict(table)
        self._resolved: dict[str, T] = {}
        self._unknown = unknown or (lambda name, known: KeyError(f"unknown {kind} {name!r}; registered: {known}"))

    def register(self, name: str, target: str | T, *, replace: bool = False) -> None:
        """Add a row: ``target`` is the object itself or its ``"module:object"`` string.

        A different target under a taken name raises ``ValueError`` unless ``replace``, so two plug-ins cannot
        silently shadow each other.
        """
        current = self._table.get(name)
        if current is not None and current is not target and current != target and not replace:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({current!r}); pass replace=True")
        self._table[name] = target
        self._resolved.pop(name, None)

    def copy(self) -> "Registry[T]":
        """An independent registry with the same rows (e.g. to register entries that must not outlive a test)."""
        twin: Registry[T] = Registry(self.kind, self._table, self._unknown)
        twin._resolved = dict(self._resolved)
        return twin

    def names(self) -> list[str]:
        """Every registered name, sorted (nothing is imported)."""
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def get(self, name: str) -> T:
        """The entry registered as ``name``, importing its module on first use."""
        if name not in self._table:
            raise self._unknown(name, self.names())
        if name not in self._resolved:
            target = self._table[name]
            self._resolved[name] = resolve(target) if isinstance(target, str) else target  # type: ignore[assignment]
        return self._resolved[name]

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, entry)`` for every row, in name order (imports every module)."""
        for name in self.names():
            yield name, self.get(name)
