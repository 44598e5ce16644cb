"""Fixtures every test folder shares. The plain functions behind them live in testkit.py
(importable from module-level helpers, which fixtures are not); the import path itself comes
from pyproject's ``[tool.pytest.ini_options] pythonpath``, so no test edits ``sys.path``."""

from __future__ import annotations

import pytest

import testkit
from launcher import launch


@pytest.fixture(scope="session")
def repo_root():
    """The checkout (a Path): the cwd of subprocesses that run tools/ and examples/."""
    return testkit.ROOT


@pytest.fixture(scope="session")
def subprocess_env():
    """The environment of a child Python that imports this checkout (testkit.subprocess_env)."""
    return testkit.subprocess_env()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The demo generator's small BPE tokenizer (tokenizer.json path), made once a session."""
    return testkit.make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The tiny demo set (train and val prefixes, 120 samples), preprocessed once a session.
    Read-only: a test that writes next to it makes its own with testkit.make_tiny_demo."""
    return testkit.make_tiny_demo(tmp_path_factory.mktemp("tiny_demo"))


@pytest.fixture(scope="session")
def launcher():
    """``launch(fn, world_size, *args)``: fn on N spawned gloo ranks (tests/distributed/launcher.py)."""
    return launch
