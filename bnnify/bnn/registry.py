"""Case-insensitive registries of posterior and prior classes, and spec parsing."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from bnnify.errors import InvalidArgumentError, UnknownNameError, closest

__all__ = ["Factory", "Spec", "parse_spec"]

T = TypeVar("T")

Spec = str | tuple[str, Mapping[str, Any]]


class _ClassFactory:
    """Factory function returning a class registered directly."""

    def __init__(self, cls: type):
        self.cls = cls

    def __call__(self) -> type:
        return self.cls

    def __repr__(self) -> str:
        return f"<factory of {self.cls.__qualname__}>"


class Factory(Generic[T]):
    """A registry mapping case-insensitive names to classes.

    Classes register with the `register` decorator; the reference API's
    `register_factory_function` (a function that returns the class) works too.

    Args:
        kind: What the registry holds, used in error messages ("posterior").
        base: The class every registered class must derive from.

    Example:
        >>> from bnnify.bnn import PriorFactory
        >>> PriorFactory["Gaussian"].__name__
        'GaussianPrior'
    """

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._factories: dict[str, Callable[[], type]] = {}
        self._resolved: dict[str, type] = {}

    @property
    def factories(self) -> Mapping[str, Callable[[], type]]:
        """Registered names (lower case) and their factory functions, read-only."""
        return MappingProxyType(self._factories)

    @property
    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._factories))

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering `cls` under `name`.

        Raises:
            ValueError: If `name` is already registered.
        """

        def decorator(cls: type[T]) -> type[T]:
            self._add(name, _ClassFactory(cls))
            return cls

        return decorator

    def register_factory_function(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator registering a function that returns the class for `name`.

        Raises:
            ValueError: If `name` is already registered.
        """

        def decorator(function: Callable[[], type]) -> Callable[[], type]:
            self._add(name, function)
            return function

        return decorator

    def _add(self, name: str, factory: Callable[[], type]) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(
                f"a {self.kind} name must be a non-empty string, got {name!r}"
            )
        key = name.strip().lower()
        if key in self._factories:
            raise InvalidArgumentError(
                f"{self.kind} name {name!r} is already registered",
                hint="Choose another name; registered names cannot be replaced.",
            )
        self._factories[key] = factory

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._factories

    def __getitem__(self, name: str) -> type[T]:
        """The class registered under `name` (case-insensitive).

        Raises:
            KeyError: (`UnknownNameError`) If nothing is registered under `name`.
        """
        if not isinstance(name, str):
            raise UnknownNameError(
                f"{self.kind} name must be a string, got {name!r}",
                hint=f"Registered {self.kind}s: {', '.join(self.names)}.",
            )
        key = name.strip().lower()
        if key not in self._factories:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{closest(key, self._factories)}",
                hint=f"Registered {self.kind}s: {', '.join(self.names)}.",
            )
        if key not in self._resolved:
            cls = self._factories[key]()
            if not (inspect.isclass(cls) and issubclass(cls, self.base)):
                raise InvalidArgumentError(
                    f"the factory registered as {self.kind} {key!r} returned {cls!r}, "
                    f"not a subclass of {self.base.__name__}"
                )
            self._resolved[key] = cls
        return self._resolved[key]


def parse_spec(spec: Spec | None, default: Spec, kind: str) -> tuple[str, dict[str, Any]]:
    """Splits a name or `(name, kwargs)` spec into a lower-case name and a kwargs dict.

    Raises:
        ValueError: (`InvalidArgumentError`) If `spec` has neither form.
    """
    if spec is None:
        spec = default
    if isinstance(spec, str):
        return spec.strip().lower(), {}
    if (
        isinstance(spec, (tuple, list))
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], Mapping)
    ):
        kwargs = dict(spec[1])
        bad = [key for key in kwargs if not isinstance(key, str)]
        if bad:
            raise InvalidArgumentError(f"{kind} keyword names must be strings, got {bad!r}")
        return spec[0].strip().lower(), kwargs
    raise InvalidArgumentError(
        f"invalid {kind} spec {spec!r}",
        hint=f'Pass a name such as "gaussian" or a tuple ("gaussian", {{...}}) for the {kind}.',
    )
