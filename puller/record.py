"""Record: the small value classes of puller (digests, references, descriptors, options,
results, events) without :mod:`dataclasses`.

A dataclass writes and ``exec``\\ s the source of its methods when its class is created:
about 1 ms a class, which the sixteen on the pull path turned into 17 ms of every
command-line start-up (more than a cold pull of a small image spends on its manifest).
A record's methods are shared, written once here.

A subclass lists its fields as annotations (``ClassVar`` ones are not fields), parents'
first; a value in the class body is the field's default (a list or dict default is copied
for each instance). Options, as class keywords: ``frozen`` (default True: assignment
raises, and the record hashes by its fields), ``kw_only`` (the constructor takes keywords
only) and ``hidden`` (field names left out of ``repr``, such as passwords). A
``__post_init__`` method, if defined, runs after the fields are set; a frozen record sets
fields there with ``object.__setattr__``. ``replace(**changes)`` returns a copy with some
fields changed, validated again.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, ClassVar

__all__ = ["Record"]

_MISSING = object()


class Record:
    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    _frozen: ClassVar[bool] = True
    _kw_only: ClassVar[bool] = False
    _hidden: ClassVar[frozenset[str]] = frozenset()
    _getter: ClassVar[Callable[[Any], tuple[Any, ...]]]

    def __init_subclass__(cls, *, frozen: bool | None = None, kw_only: bool | None = None,
                          hidden: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [n for n, t in cls.__dict__.get("__annotations__", {}).items()
               if "ClassVar" not in str(t)]
        cls._fields = tuple(dict.fromkeys([*cls._fields, *own]))
        defaults = dict(cls._defaults)
        for name in own:
            value = cls.__dict__.get(name, _MISSING)
            if value is _MISSING:
                defaults.pop(name, None)
            else:
                defaults[name] = value
        cls._defaults = defaults
        if frozen is not None:
            cls._frozen = frozen
        if kw_only is not None:
            cls._kw_only = kw_only
        cls._hidden = cls._hidden | frozenset(hidden)
        # All of a record's field values as one tuple, in C (records are dict keys on
        # the hot path: digests, references).
        if len(cls._fields) > 1:
            cls._getter = operator.attrgetter(*cls._fields)
        else:
            names = cls._fields
            cls._getter = staticmethod(  # type: ignore[assignment]
                lambda r: tuple(getattr(r, n) for n in names))
        if not cls._frozen and "__hash__" not in cls.__dict__:
            cls.__hash__ = None  # type: ignore[assignment]  # mutable: unhashable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if args:
            if self._kw_only:
                raise TypeError(f"{type(self).__name__} takes keyword arguments only")
            if len(args) > len(fields):
                raise TypeError(f"{type(self).__name__} takes at most {len(fields)} "
                                f"arguments ({len(args)} given)")
            for name, value in zip(fields, args, strict=False):  # args may be fewer
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__} got two values for {name!r}")
                kwargs[name] = value
        defaults = self._defaults
        put = object.__setattr__
        for name in fields:
            value = kwargs.pop(name, _MISSING)
            if value is _MISSING:
                value = defaults.get(name, _MISSING)
                if value is _MISSING:
                    raise TypeError(f"{type(self).__name__} needs {name!r}")
                if type(value) in (list, dict):
                    value = value.copy()
            put(self, name, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kwargs))!r}")
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__delattr__(self, name)

    def _values(self) -> tuple[Any, ...]:
        return type(self)._getter(self)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields
                          if n not in self._hidden)
        return f"{type(self).__name__}({inner})"

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (and checked like a new record)."""
        values = {n: getattr(self, n) for n in self._fields}
        values.update(changes)
        return type(self)(**values)

    def as_dict(self) -> dict[str, Any]:
        """The fields and their values, in order; records inside (also in lists, tuples
        and dict values) become dicts too, as :func:`dataclasses.asdict` does."""
        return {n: _plain(getattr(self, n)) for n in self._fields}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
