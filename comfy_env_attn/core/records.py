"""`dataclass`, as the standard library's, made in one pass on Python 3.11 and 3.12.

There the standard library compiles each method it writes for a class in an exec of its own
(Python 3.13 compiles them together): 258 methods for the 46 classes a quick `install` loads,
about 40 ms of its 120 ms of imports on a 2-core machine, paid at every start of the command
line and of ComfyUI. Here the standard library still reads the fields (with init, repr and
eq off, it writes no method), so that `fields`, `replace` and `asdict` work unchanged. Only
`__init__`, which runs for every record made, is compiled, when it is first looked up (a
quick install makes records of 35 of the 46 classes it loads: the others' are never
compiled); `__repr__`, `__eq__`, `__hash__` and a frozen class's `__setattr__` and `__delattr__` are closures over the field names, read
in C by operator.attrgetter. Their meaning is the standard library's (tests/test_records.py
holds the two side by side). What this does not write (any other option, an InitVar,
keyword-only fields, a field out of `__init__`, a dataclass base) goes to the standard
library whole.

mypy checks every class as a standard dataclass: under TYPE_CHECKING the name is the
standard library's own.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or sys.version_info >= (3, 13):
    from dataclasses import dataclass as dataclass
else:
    import abc
    import dataclasses
    import inspect
    import operator
    import reprlib

    _standard = dataclasses.dataclass

    def dataclass(cls: Any = None, /, *, frozen: bool = False, **options: Any) -> Any:
        """@dataclass and @dataclass(frozen=True) (any other option: the standard one)."""
        def wrap(cls: type) -> type:
            if options or _unusual(cls):
                return _standard(cls, frozen=frozen, **options)  # type: ignore[no-any-return,call-overload]
            return _make(cls, frozen)

        return wrap if cls is None else wrap(cls)

    def _unusual(cls: type) -> bool:
        """What only the standard library writes: a dataclass base (its checks of frozen
        against non-frozen bases, inherited InitVars and keyword-only fields), an InitVar,
        a keyword-only field, a field out of __init__."""
        if any(hasattr(base, "__dataclass_fields__") for base in cls.__mro__[1:]):
            return True
        for ann in inspect.get_annotations(cls).values():
            text = ann if isinstance(ann, str) else repr(ann)
            if "InitVar" in text or "KW_ONLY" in text:
                return True
        return any(isinstance(v, dataclasses.Field) and (v.kw_only is True or not v.init)
                   for v in cls.__dict__.values())

    def _make(cls: type, frozen: bool) -> type:
        own = dict(cls.__dict__)  # what the class body wrote itself, which stays
        documented = bool(cls.__doc__)
        _standard(cls, init=False, repr=False, eq=False)
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        params.init = params.repr = params.eq = True  # what this writes (a subclass reads it)
        params.frozen = frozen
        fields = dataclasses.fields(cls)
        made: dict[str, Any] = {}
        if "__init__" not in own:
            _check_defaults(fields)
            made["__init__"] = _LazyInit(cls, fields, frozen, hasattr(cls, "__post_init__"))
        if "__repr__" not in own:
            made["__repr__"] = _repr([f.name for f in fields if f.repr])
        if "__eq__" not in own:
            made["__eq__"] = _eq([f.name for f in fields if f.compare])
        explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
        if frozen and not explicit_hash:
            made["__hash__"] = _hash([f.name for f in fields
                                      if (f.compare if f.hash is None else f.hash)])
        elif not explicit_hash:
            made["__hash__"] = None  # eq without frozen: unhashable, as the standard one
        if frozen:
            for name in ("__setattr__", "__delattr__"):
                if name in own:
                    raise TypeError(f"Cannot overwrite attribute {name} in class "
                                    f"{cls.__name__}")
            made.update(_frozen(cls, frozenset(f.name for f in fields)))
        for name, fn in made.items():
            if fn is not None and name != "__init__":
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, fn)
        if not documented:
            cls.__doc__ = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
        abc.update_abstractmethods(cls)
        return cls

    def _values(names: list[str]) -> Any:
        """The fields' values as one tuple, read in C (zero or one field: still a tuple)."""
        if len(names) > 1:
            return operator.attrgetter(*names)
        if names:
            one = operator.attrgetter(names[0])
            return lambda obj: (one(obj),)
        return lambda obj: ()

    def _repr(names: list[str]) -> Any:
        get = _values(names)

        @reprlib.recursive_repr()
        def __repr__(self: Any) -> str:
            shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, get(self), strict=True))
            return f"{self.__class__.__qualname__}({shown})"

        return __repr__

    def _eq(names: list[str]) -> Any:
        get = _values(names)

        def __eq__(self: Any, other: Any) -> Any:
            if other.__class__ is self.__class__:
                return get(self) == get(other)
            return NotImplemented

        return __eq__

    def _hash(names: list[str]) -> Any:
        get = _values(names)

        def __hash__(self: Any) -> int:
            return hash(get(self))

        return __hash__

    def _frozen(cls: type, names: frozenset[str]) -> dict[str, Any]:
        def __setattr__(self: Any, name: str, value: Any) -> None:
            if type(self) is cls or name in names:
                raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)

        def __delattr__(self: Any, name: str) -> None:
            if type(self) is cls or name in names:
                raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)

        return {"__setattr__": __setattr__, "__delattr__": __delattr__}

    class _Factory:
        def __repr__(self) -> str:
            return "<factory>"  # in signatures and __doc__, as the standard library shows it

    _FACTORY = _Factory()

    def _check_defaults(fields: tuple[dataclasses.Field[Any], ...]) -> None:
        """The standard library's refusal, when the class is made: a field without a default
        after one with a default."""
        defaulted = False
        for f in fields:  # every field is in __init__ here (_unusual)
            default = f.default is not dataclasses.MISSING or \
                f.default_factory is not dataclasses.MISSING
            if defaulted and not default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
            defaulted = defaulted or default

    class _LazyInit:
        """A class's __init__ until it is first looked up, which compiles it (_init) and puts
        it in the class in its place: by making a record, or by reading `cls.__init__`
        (inspect.signature, typing.get_type_hints), which then see the compiled function
        itself. Compiling costs about 0.1 ms a class, and a command makes records of only
        some of the classes it loads (a quick install: 35 of 46)."""

        __slots__ = ("cls", "fields", "frozen", "post_init")

        def __init__(self, cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool,
                     post_init: bool) -> None:
            self.cls, self.fields, self.frozen, self.post_init = cls, fields, frozen, post_init

        def __get__(self, obj: Any, owner: type | None = None) -> Any:
            init = _init(self.cls, self.fields, self.frozen, self.post_init)
            init.__qualname__ = f"{self.cls.__qualname__}.__init__"
            # in the class's own dict, where this stood (a second thread's twin is as good)
            type.__setattr__(self.cls, "__init__", init)
            return init.__get__(obj, owner)

    def _init(cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool,
              post_init: bool) -> Any:
        """__init__, compiled: it runs for every record made (17,000 in a plan over the
        embedded index), where a generic one would cost a few microseconds each. As the
        standard library writes it: in the module's globals, its own names passed in as
        arguments of a function that makes it, and named so that no field meets them."""
        names: dict[str, Any] = {"__dataclass_FACTORY__": _FACTORY,
                                 "__dataclass_setattr__": object.__setattr__}
        params: list[str] = []
        body: list[str] = []
        for f in fields:
            if f.default_factory is not dataclasses.MISSING:
                names[f"__dataclass_factory_{f.name}__"] = f.default_factory
                params.append(f"{f.name}=__dataclass_FACTORY__")
                value = (f"__dataclass_factory_{f.name}__() if {f.name} is "
                         f"__dataclass_FACTORY__ else {f.name}")
            elif f.default is not dataclasses.MISSING:
                names[f"__dataclass_default_{f.name}__"] = f.default
                params.append(f"{f.name}=__dataclass_default_{f.name}__")
                value = f.name
            else:
                params.append(f.name)
                value = f.name
            body.append(f"    __dataclass_setattr__(__dataclass_self__, {f.name!r}, {value})"
                        if frozen else f"    __dataclass_self__.{f.name} = {value}")
        if post_init:
            body.append("    __dataclass_self__.__post_init__()")
        src = (f"def __create_fn__({', '.join(names)}):\n"
               f"  def __init__({', '.join(['__dataclass_self__', *params])}):\n"
               + "\n".join(body or ["    pass"]) + "\n  return __init__")
        made: dict[str, Any] = {}
        module = sys.modules.get(cls.__module__)
        exec(src, module.__dict__ if module else {}, made)
        init = made["__create_fn__"](**names)
        init.__annotations__ = {**{f.name: f.type for f in fields}, "return": None}
        return init
