"""Fixtures of the test suite (the helpers themselves live in ``tests/testing.py``)."""

from __future__ import annotations

import pytest

from .testing import CASES, Case


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> Case:
    return request.param
