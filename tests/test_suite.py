"""The test suite's own bookkeeping: the slow tests conftest marks are there, and the marker is registered."""

from pathlib import Path

from conftest import SLOW

HERE = Path(__file__).parent


def test_every_slow_test_named_exists():
    """A renamed test drops out of SLOW silently (it would then run in the quick subset): this says so."""
    for file, tests in SLOW.items():
        source = (HERE / file).read_text()
        for name in tests:
            assert f"def {name}(" in source, f"conftest.SLOW names {file}::{name}, which is not there"


def test_the_slow_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
