"""Shared test settings. Area-specific fixtures live in their own test modules
(or in ``tests/_*.py`` helpers imported from them)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Remote datasets are cached per test session, never in the user's home."""
    os.environ["PAPLOSS_CACHE"] = str(tmp_path_factory.mktemp("paploss-cache"))
    yield
