"""Reliability and security drills (issue 9): fuzzing, faults, crashes, load, access.

The drills are bounded by default (the whole folder runs in a few minutes on two cores);
``--long-drills`` scales every drill up (more Hypothesis examples, more kill -9 rounds, a longer
soak). pytest only registers the option when this folder is named on the command line:
``pytest tests/drills --long-drills``.
"""

from __future__ import annotations

import os

import pytest

ENV = "FLEECE_LONG_DRILLS"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long-drills",
        action="store_true",
        default=False,
        help="scale the reliability drills up (tests/drills): more examples, rounds, seconds",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Read at import time by the drill modules (Hypothesis settings are decorator arguments).
    if config.getoption("--long-drills", default=False):
        os.environ[ENV] = "1"


@pytest.fixture(scope="session")
def long_drills() -> bool:
    """True when the drills run in their long form."""
    return os.environ.get(ENV) == "1"
