"""`run_in_child`: results and exceptions come back; a killed child is a one-line error."""

from __future__ import annotations

import os

import pytest

from rpiae.isolation import ChildProcessDied, run_in_child


def test_result_and_exception_come_back_from_the_child():
    assert run_in_child(sum, [1, 2, 3]) == 6
    assert run_in_child(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        run_in_child(int, "not a number")


def test_a_killed_child_is_a_clear_error():
    with pytest.raises(ChildProcessDied, match=r"^the test step was killed before it finished \(out of memory\?\)$"):
        run_in_child(os.abort, what="the test step")
