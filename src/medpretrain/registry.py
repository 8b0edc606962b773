"""One registry shape for everything chosen by name: methods, protocols, executors and backbones.

A `Registry` maps a name to its entry (a class, an instance or a spec), refuses a second entry under one name,
and answers an unknown name with the same one-line error everywhere ("unknown protocol 'x'", then the names
to choose from). It is a read-only `Mapping`, so `name in REGISTRY`, `sorted(REGISTRY)` and `REGISTRY[name]`
read as they would on a dict. timm's `register_model`/`create_model` is the model; a dict wrapped this thinly
is not worth a dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from medpretrain.errors import MedpretrainError

T = TypeVar("T")
C = TypeVar("C")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind (`what` names the kind in error messages)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a second entry under one name is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, make: Callable[[C], T]) -> Callable[[C], C]:
        """A class decorator registering `make(cls)` under `cls.name` and returning the class unchanged."""

        def register(cls: C) -> C:
            self.add(cls.name, make(cls))  # type: ignore[attr-defined]
            return cls

        return register

    def get(self, name: str) -> T:  # type: ignore[override]  (a miss is an input error, never None)
        """The entry of `name`, or a MedpretrainError naming the valid names."""
        if name not in self._entries:
            raise MedpretrainError(f"unknown {self.what} '{name}'", f"choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["Registry"]
