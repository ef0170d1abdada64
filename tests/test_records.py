"""core.records.dataclass against the standard library's, side by side: each class is made
by both from one body, and everything a caller can see of the two must agree."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from comfy_env_attn.core import records

Maker = Callable[..., Any]
BOTH = [pytest.param(dataclasses.dataclass, id="standard"),
        pytest.param(records.dataclass, id="records")]


def pair(body: Callable[[Maker], type]) -> tuple[type, type]:
    return body(dataclasses.dataclass), body(records.dataclass)


def plain(make: Maker) -> type:
    @make
    class Plain:
        """A plain record."""
        name: str
        size: int = 3
        tags: list[str] = dataclasses.field(default_factory=list)
        hidden: str = dataclasses.field(default="h", repr=False, compare=False)
        kind: ClassVar[str] = "plain"

    return Plain


def frozen(make: Maker) -> type:
    @make(frozen=True)
    class Frozen:
        """A frozen record."""
        name: str
        version: str = "1"
        extra: dict[str, str] = dataclasses.field(default_factory=dict, compare=False,
                                                  hash=False)
        flag: bool = dataclasses.field(default=False, hash=False)

    return Frozen


def test_plain_behaves_as_the_standard_one() -> None:
    std, ours = pair(plain)
    for cls in (std, ours):
        a = cls("x")
        assert (a.name, a.size, a.tags, a.hidden) == ("x", 3, [], "h")
        assert cls("x").tags is not a.tags  # a fresh list per record
        b = cls("x", 3, [], "other")
        assert a == b  # hidden is not compared
        assert a != cls("x", 4)
        assert (a == "x") is False
        assert a.__eq__(object()) is NotImplemented
        a.size = 9  # not frozen
        assert a.size == 9
        with pytest.raises(TypeError, match="unhashable"):
            hash(a)
        assert cls.kind == "plain"
        assert [f.name for f in dataclasses.fields(cls)] == ["name", "size", "tags", "hidden"]
        assert cls.__match_args__ == ("name", "size", "tags", "hidden")
    assert repr(std("x", 2, ["t"])) == repr(ours("x", 2, ["t"])).replace(
        ours.__qualname__, std.__qualname__)
    assert dataclasses.asdict(std("x")) == dataclasses.asdict(ours("x"))


@pytest.mark.parametrize("args, kwargs", [((), {}), (("a", 1, [], "h", "extra"), {}),
                                          (("a",), {"nope": 1}), (("a",), {"name": "b"})])
def test_wrong_arguments_fail_alike(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for cls in pair(plain):
        with pytest.raises(TypeError):
            cls(*args, **kwargs)


def test_frozen_behaves_as_the_standard_one() -> None:
    std, ours = pair(frozen)
    for cls in (std, ours):
        a = cls("x", extra={"k": "v"})
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'name'"):
            a.name = "y"
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'name'"):
            del a.name
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.other = 1  # not a field either: the class is frozen whole
        assert a == cls("x")  # extra is not compared
        assert {a, cls("x", flag=True)} == {a, cls("x", flag=True)}
        assert len({a, cls("x", flag=True)}) == 2  # compared, though not hashed
        b = dataclasses.replace(a, version="2")
        assert (b.name, b.version, b.extra) == ("x", "2", {"k": "v"})
    # equal fields hash alike in both: the same tuple of the same fields
    assert hash(std("x", "3", flag=True)) == hash(ours("x", "3", flag=True))
    assert repr(std("x")) == repr(ours("x")).replace(ours.__qualname__, std.__qualname__)


def test_fields_out_of_init_and_post_init() -> None:
    def body(make: Maker) -> type:
        @make
        class Made:
            """Made."""
            a: int
            b: list[int] = dataclasses.field(init=False, default_factory=list)
            c: int = dataclasses.field(init=False, default=7)
            d: int = dataclasses.field(init=False)

            def __post_init__(self) -> None:
                self.d = self.a * 2

        return Made

    for cls in pair(body):
        m = cls(2)
        assert (m.a, m.b, m.c, m.d) == (2, [], 7, 4)
        with pytest.raises(TypeError):
            cls(2, [1])


def test_what_the_class_writes_itself_stays() -> None:
    def body(make: Maker) -> type:
        @make(frozen=True)
        class Own:
            """Own."""
            a: int

            def __repr__(self) -> str:
                return "own"

            def __eq__(self, other: object) -> bool:
                return True

            def __hash__(self) -> int:
                return 5

        return Own

    for cls in pair(body):
        assert repr(cls(1)) == "own" and cls(1) == cls(2) and hash(cls(1)) == 5

    def setter(make: Maker) -> type:
        @make(frozen=True)
        class Bad:
            a: int

            def __setattr__(self, name: str, value: Any) -> None:
                pass

        return Bad

    for make in (dataclasses.dataclass, records.dataclass):
        with pytest.raises(TypeError, match="Cannot overwrite attribute __setattr__"):
            setter(make)


def test_eq_written_without_hash_leaves_it_unhashable_as_the_standard_one() -> None:
    def body(make: Maker) -> type:
        @make
        class Eq:
            """Eq."""
            a: int

            def __eq__(self, other: object) -> bool:
                return False

        return Eq

    for cls in pair(body):
        assert cls.__hash__ is None


def test_inheritance() -> None:
    def body(make: Maker) -> type:
        @make(frozen=True)
        class Base:
            """Base."""
            a: int
            b: int = 1

        @make(frozen=True)
        class Child(Base):
            """Child."""
            c: int = 2

        return Child

    for cls in pair(body):
        child = cls(0, c=5)
        assert (child.a, child.b, child.c) == (0, 1, 5)
        assert [f.name for f in dataclasses.fields(cls)] == ["a", "b", "c"]
        with pytest.raises(dataclasses.FrozenInstanceError):
            child.a = 1


def test_undocumented_class_gets_the_standard_docstring() -> None:
    def body(make: Maker) -> type:
        @make
        class Bare:
            a: int
            b: str = "x"

        return Bare

    std, ours = pair(body)
    assert ours.__doc__ == std.__doc__ == "Bare(a: 'int', b: 'str' = 'x')"


@pytest.mark.parametrize("make", BOTH)
def test_other_options_and_fields_are_the_standard_ones(make: Maker) -> None:
    @make(order=True)
    class Ordered:
        """Ordered."""
        a: int

    assert Ordered(1) < Ordered(2)

    @make
    class KwOnly:
        """KwOnly."""
        a: int = dataclasses.field(kw_only=True)

    assert KwOnly(a=1).a == 1
    with pytest.raises(TypeError):
        KwOnly(1)

    @make
    class WithInitVar:
        """WithInitVar."""
        a: int
        scale: dataclasses.InitVar[int] = 1

        def __post_init__(self, scale: int) -> None:
            self.a *= scale

    assert WithInitVar(2, 3).a == 6
    assert [f.name for f in dataclasses.fields(WithInitVar)] == ["a"]


def test_python_313_uses_the_standard_one_itself() -> None:
    if sys.version_info >= (3, 13):
        assert records.dataclass is dataclasses.dataclass
    else:
        assert records.dataclass is not dataclasses.dataclass


def test_the_package_makes_its_records_here() -> None:
    """Every module of the package takes `dataclass` from core.records: one that took the
    standard library's again would pay its cost at every start. runtime/taylor.py stands
    alone, on the standard library and torch only (tests/test_taylor.py)."""
    import ast
    import pathlib

    root = pathlib.Path(records.__file__).parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if path.name in ("records.py", "taylor.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            imported = isinstance(node, ast.ImportFrom) and node.module == "dataclasses" \
                and any(a.name == "dataclass" for a in node.names)
            named = isinstance(node, ast.Attribute) and node.attr == "dataclass" and \
                isinstance(node.value, ast.Name) and node.value.id == "dataclasses"
            if imported or named:
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_what_a_hostile_review_found_is_as_the_standard_one() -> None:
    """Inheritance between frozen and non-frozen classes, a subclass's own default for a
    field out of __init__, field names the generated code could meet, a non-default field
    after a default one, type hints and signatures of __init__, __dataclass_params__."""
    import inspect
    import typing

    for make in (dataclasses.dataclass, records.dataclass):
        @make(frozen=True)
        class Frozen:
            """Frozen."""
            a: int

        @make
        class Thawed:
            """Thawed."""
            a: int

        with pytest.raises(TypeError, match="cannot inherit non-frozen dataclass from a "
                                            "frozen one"):
            make(type("Sub", (Frozen,), {"__annotations__": {"b": "int"}}))
        with pytest.raises(TypeError, match="cannot inherit frozen dataclass from a "
                                            "non-frozen one"):
            make(frozen=True)(type("Sub", (Thawed,), {"__annotations__": {"b": "int"}}))

        @make(frozen=True, order=True)
        class Ordered(Frozen):
            """Ordered."""
            b: int = 0

        assert Ordered(1) < Ordered(2)
        assert Frozen.__dataclass_params__.frozen is True  # type: ignore[attr-defined]

        @make
        class Kind:
            """Kind."""
            kind: str = dataclasses.field(default="a", init=False)

        class Other(Kind):
            kind = "b"

        assert Other().kind == "b"

        @make
        class Clash:
            """Clash."""
            _MISSING: int = 0
            __dataclass_self__x: int = 1
            items: list[int] = dataclasses.field(default_factory=list)
            _object_setattr: int = 2

        c = Clash()
        assert (c._MISSING, c.items, c._object_setattr) == (0, [], 2)
        with pytest.raises(TypeError, match="non-default argument 'y' follows default "
                                            "argument"):
            make(type("Bad", (), {"__annotations__": {"x": "int", "y": "int"}, "x": 1}))

        @make
        class Hinted:
            """Hinted."""
            xs: list[int] = dataclasses.field(default_factory=list)
            n: int = 1

        assert typing.get_type_hints(Hinted.__init__) == \
            {"xs": list[int], "n": int, "return": type(None)}
        assert str(inspect.signature(Hinted)) == \
            "(xs: 'list[int]' = <factory>, n: 'int' = 1) -> None"


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="the standard library's own there")
def test_init_is_compiled_when_first_looked_up() -> None:
    """A class's __init__ is compiled when it is first needed, and from then on is a plain
    function in the class: whether a record is made first by a subclass (its own __init__
    calling super's, or none of its own), or the class's __init__ is read first."""
    @records.dataclass(frozen=True)
    class Base:
        """Base."""
        a: int
        b: list[int] = dataclasses.field(default_factory=list)

    class Child(Base):  # no fields of its own: Base's __init__
        pass

    class Calls(Base):
        def __init__(self, a: int) -> None:
            super().__init__(a * 2)

    import types

    assert not isinstance(Base.__dict__["__init__"], types.FunctionType)  # not compiled yet
    assert (Calls(2).a, Calls(2).b) == (4, [])
    assert isinstance(Base.__dict__["__init__"], types.FunctionType)
    assert "__init__" not in Child.__dict__
    assert Child(1) == Child(1, [])
    assert Base.__init__.__qualname__.endswith("Base.__init__")

    @records.dataclass
    class Read:
        """Read."""
        x: int = 1

    init = Read.__init__  # read first: the compiled function itself
    assert isinstance(init, types.FunctionType) and Read.__dict__["__init__"] is init
    assert Read().x == 1
    with pytest.raises(TypeError):
        Read(1, 2)
