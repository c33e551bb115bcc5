"""Hypothesis profiles of the fuzz tests, chosen by HYPOTHESIS_PROFILE.

- ``ci`` (the default, what `make test` runs): 60 examples per target (15 for
  each agent method), so the whole of tests/fuzz takes about half a minute here;
- ``fuzz`` (`make fuzz`): FUZZ_EXAMPLES examples per target (default 20000);
- ``dev``: ``ci`` with verbose output, to watch what is generated.

No profile has a per-example deadline: this host is shared and its load
varies, and a wall-clock threshold would fail for that alone. Hangs are
caught by the targets themselves instead (support.cpu_limit for synchronous
code, support.hang_guard around every awaited call), and by pytest-timeout.
The database (tests/fuzz/.hypothesis, not committed) replays a failure
first on the next run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Verbosity, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_COMMON = {
    "deadline": None,
    "print_blob": True,
    "database": DirectoryBasedExampleDatabase(str(Path(__file__).parent / ".hypothesis")),
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.function_scoped_fixture],
}

settings.register_profile("ci", max_examples=60, **_COMMON)
settings.register_profile("dev", parent=settings.get_profile("ci"),
                          verbosity=Verbosity.verbose)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
                          **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _quiet_pykata_logs() -> Iterator[None]:
    """The targets log every odd frame and refused request: thousands of lines of
    noise in a fuzz run. Only errors are kept (and shown with a failure)."""
    logger = logging.getLogger("pykata")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
