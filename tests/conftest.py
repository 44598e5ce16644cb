"""Fixtures every test folder shares. The plain functions behind them live in testkit.py
(importable from module-level helpers, which fixtures are not); the import path itself comes
from pyproject's ``[tool.pytest.ini_options] pythonpath``, so no test edits ``sys.path``."""

from __future__ import annotations

import os

import pytest

import testkit
from launcher import launch


@pytest.fixture(autouse=True)
def no_leaked_launcher_variables():
    """A test that leaves torchrun's variables in this process's environment fails (and they are
    put back): later tests would inherit a rank and a world size, and their subprocesses too
    (a leaked WORLD_SIZE=16 made a curation tool refuse to run as if under torchrun). Set up
    before ``monkeypatch``, so it checks after monkeypatch has undone its changes."""
    before = {k: os.environ.get(k) for k in testkit.LAUNCHER_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in testkit.LAUNCHER_VARIABLES}
    leaked = {k: v for k, v in after.items() if v != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if leaked:
        pytest.fail(f"the test changed launcher variables in os.environ and left them: {leaked}")


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
