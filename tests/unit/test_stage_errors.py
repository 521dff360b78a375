"""A stage that fails while running names itself: StageError, raised from the original."""

from __future__ import annotations

import traceback

import pytest

from mm_retrieval.errors import InputError, StageError
from mm_retrieval.stages.base import Source, Stage
from mm_retrieval.types import Record


class Flaky(Source):
    stage_kind, stage_name = "source", "flaky"

    def records(self):
        yield Record(path=None, text="first")
        raise ValueError("row 2 is garbled")

    @property
    def problems(self):
        return {}["missing"]  # a bug in a property of the contract


class Refusing(Source):
    stage_kind, stage_name = "source", "refusing"

    def records(self):
        raise InputError("not a folder: /nope")
        yield  # a generator


def test_an_unexpected_exception_becomes_a_stage_error_naming_stage_and_method():
    src = Flaky()
    it = src.records()
    assert next(it).text == "first"  # records before the failure still arrive
    with pytest.raises(StageError) as e:
        next(it)
    assert e.value.stage == "source/flaky"
    assert str(e.value) == "[source/flaky] records() failed: ValueError: row 2 is garbled"
    assert isinstance(e.value.__cause__, ValueError)
    # the traceback still leads to the line that raised
    assert 'raise ValueError("row 2 is garbled")' in "".join(traceback.format_exception(e.value))
    with pytest.raises(StageError, match=r"\[source/flaky\] problems\(\) failed: KeyError"):
        src.problems


def test_mmr_errors_pass_through_unchanged():
    with pytest.raises(InputError, match="^not a folder: /nope$"):
        list(Refusing().records())


def test_subclass_overrides_are_guarded_once_and_keep_their_names():
    class Flakier(Flaky):
        def records(self):
            yield from super().records()

    assert Flakier.records.__name__ == "records" and Flakier.records.__qualname__.endswith("Flakier.records")
    with pytest.raises(StageError) as e:
        list(Flakier().records())
    assert isinstance(e.value.__cause__, ValueError)  # not a StageError wrapping a StageError


def test_roles_are_abstract_base_classes():
    with pytest.raises(TypeError, match="records"):
        Source()  # type: ignore[abstract]

    class Half(Source):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Half()
    assert issubclass(Flaky, Stage)
