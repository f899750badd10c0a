"""Fixtures of the twin tests."""

from __future__ import annotations

import pytest

from tests.twins.kit import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()
