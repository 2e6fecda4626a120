"""puller.record: the value classes behave as the dataclasses they replaced did."""

from __future__ import annotations

from typing import ClassVar

import pytest

from puller.client import ClientOptions
from puller.credentials import Credentials
from puller.digest import Digest
from puller.errors import InvalidDigest
from puller.record import Record


class Point(Record):
    x: int
    y: int = 0
    tags: list[str] = []
    scale: ClassVar[int] = 10  # not a field

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("x must not be negative")


class Point3(Point, hidden=("z",)):
    z: int = 0


class Counter(Record, frozen=False, kw_only=True):
    n: int = 0


def test_fields_come_from_annotations_in_order_with_defaults() -> None:
    assert Point._fields == ("x", "y", "tags") and Point3._fields == ("x", "y", "tags", "z")
    p = Point(1)
    assert (p.x, p.y, p.tags) == (1, 0, [])
    assert Point(1, 2) == Point(x=1, y=2) and Point(1, 2) != Point(1, 3)
    assert Point(1).tags is not Point(1).tags  # a list default is copied per record
    assert hash(Point(1, 2, ())) == hash(Point(1, 2, ()))
    assert Point(1) != Point3(1)  # another class is never equal


def test_one_field_and_no_field_records_compare_and_hash() -> None:
    class One(Record):
        a: int

    class Empty(Record):
        pass

    assert One(1) == One(1) and One(1) != One(2) and hash(One(1)) == hash(One(1))
    assert One(1)._values() == (1,) and Empty()._values() == () and Empty() == Empty()


def test_wrong_arguments_are_type_errors() -> None:
    with pytest.raises(TypeError, match="needs 'x'"):
        Point()
    with pytest.raises(TypeError, match="no field 'w'"):
        Point(1, w=2)
    with pytest.raises(TypeError, match="two values"):
        Point(1, x=2)
    with pytest.raises(TypeError, match="at most"):
        Point(1, 2, [], 4)
    with pytest.raises(TypeError, match="keyword"):
        Counter(1)  # type: ignore[misc]


def test_frozen_records_refuse_assignment_and_mutable_ones_do_not_hash() -> None:
    p = Point(1)
    with pytest.raises(AttributeError, match="immutable"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del p.x
    c = Counter(n=1)
    c.n = 2
    assert c.n == 2
    with pytest.raises(TypeError):
        hash(c)


def test_post_init_validates_and_replace_validates_again() -> None:
    with pytest.raises(ValueError):
        Point(-1)
    p = Point(1, 2)
    assert p.replace(y=5) == Point(1, 5) and p == Point(1, 2)
    with pytest.raises(ValueError):
        p.replace(x=-1)
    with pytest.raises(InvalidDigest):
        Digest("sha256", "0" * 64).replace(hex="../../etc")
    assert ClientOptions().replace(retries=0).retries == 0
    with pytest.raises(ValueError):
        ClientOptions().replace(stall_timeout=0)


def test_repr_leaves_hidden_fields_out() -> None:
    assert repr(Point3(1, z=9)) == "Point3(x=1, y=0, tags=[])"
    shown = repr(Credentials("alice", "s3cret", "refresh"))
    assert "alice" in shown and "s3cret" not in shown and "refresh" not in shown
    assert Point3(1).as_dict() == {"x": 1, "y": 0, "tags": [], "z": 0}


def test_as_dict_turns_nested_records_into_dicts() -> None:
    outer = Point(1, 2, [Point(3), (Point(4),), {"k": Point(5)}])  # type: ignore[list-item]
    assert outer.as_dict() == {"x": 1, "y": 2, "tags": [
        {"x": 3, "y": 0, "tags": []},
        ({"x": 4, "y": 0, "tags": []},),
        {"k": {"x": 5, "y": 0, "tags": []}}]}
