"""scoped_env: a variable set for one block, then exactly what was there before."""

from __future__ import annotations

import os

import pytest

from orchestrator.scoped_env import scoped_env

NAME = "CONACLIP_TEST_SCOPED_ENV"


def test_unset_before_is_unset_after_even_when_the_block_raises(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    with pytest.raises(RuntimeError), scoped_env(NAME, "1"):
        assert os.environ[NAME] == "1"
        raise RuntimeError("boom")
    assert NAME not in os.environ


def test_a_value_before_is_put_back(monkeypatch):
    monkeypatch.setenv(NAME, "user")
    with scoped_env(NAME, "ours"):
        assert os.environ[NAME] == "ours"
    assert os.environ[NAME] == "user"
