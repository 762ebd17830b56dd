from __future__ import annotations

import pytest

import serve.auth  # noqa: F401  (registers the authentication errors)
import serve.users  # noqa: F401  (registers the account errors)
from engine import errors


def test_a_duplicate_code_fails_at_class_definition() -> None:
    with pytest.raises(TypeError, match="'exhausted'.*taken by engine.errors.Exhausted"):

        class AnotherExhausted(errors.Conflict):
            code = "exhausted"

    assert errors.registry()["exhausted"] is errors.Exhausted


def test_an_inherited_code_is_a_duplicate_unless_the_class_does_not_register() -> None:
    with pytest.raises(TypeError, match="'conflict'"):

        class Grouping(errors.Conflict):
            pass

    class Abstract(errors.Conflict, register=False):
        pass

    assert errors.registry()["conflict"] is errors.Conflict


def test_every_code_maps_to_one_class_and_back() -> None:
    reg = errors.registry()
    assert len(set(reg.values())) == len(reg)
    for code, cls in reg.items():
        assert cls.code == code
        assert type(errors.from_code(code, "why")) is cls


def test_a_class_derived_outside_the_tree_does_not_register() -> None:
    class RemoteFailure(Exception):
        pass

    derived = type("RemoteFailure(Exhausted)", (RemoteFailure, errors.Exhausted), {})
    assert errors.registry()["exhausted"] is errors.Exhausted
    assert type(errors.rebuild(derived("gone"))) is errors.Exhausted


def test_rebuild_takes_a_returned_failure_or_an_error() -> None:
    from actors.calls import Failure

    back = errors.rebuild(Failure("code_void", "void"))
    assert type(back) is errors.CodeVoid and back.message == "void"
    again = errors.rebuild(errors.Fenced("stale"))
    assert type(again) is errors.Fenced and again.message == "stale"
