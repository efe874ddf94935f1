"""lgnet's pytest plugin (registered as the `lgnet` pytest11 entry point) and test helpers.

A face over lab.py: everything here is also reachable without pytest.

    import lgnet
    with lgnet.up("scenarios/ping-pair.yaml") as lab:     # always torn down
        port = lab.port("lan0")
        ...

The `lab` fixture brings a scenario up for one test and tears it down afterwards, whatever
happens. Name the scenario with a marker, or parametrize the fixture indirectly:

    @pytest.mark.lgnet_scenario("scenarios/ping-pair.yaml")
    def test_ping(lab): ...

    @pytest.mark.parametrize("lab", ["a.yaml", "b.yaml"], indirect=True)
    def test_both(lab): ...

Relative paths are taken from the directory pytest runs in. Every delivery is captured
(`lab.capture(net)`); with `--lgnet-pcap DIR` the pcapng files of every lab a test brings up
— the fixture's, and each `lgnet.up()` without its own pcap= — are kept in DIR/<test name>/
(a second lab of the same test: DIR/<test name>-2/, and so on).
"""
from __future__ import annotations

import os
import re

import pytest

from lgnet.lab import Lab, kept_captures, up

__all__ = ["Lab", "up", "lab"]

MARKER = "lgnet_scenario"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("lgnet")
    group.addoption("--lgnet-pcap", metavar="DIR", default=None,
                    help="keep the capture of every lab fixture in DIR/<test name>/")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "%s(path): the scenario the `lab` fixture brings up"
                            % MARKER)


@pytest.fixture(autouse=True)
def _lgnet_keep_captures(request):
    """With --lgnet-pcap DIR: every lab this test brings up keeps its capture under DIR."""
    keep = request.config.getoption("--lgnet-pcap")
    if not keep:
        yield
        return
    kept_captures.keep_in(os.path.join(keep, re.sub(r"[^\w.-]+", "_", request.node.name)))
    try:
        yield
    finally:
        kept_captures.keep_in(None)


@pytest.fixture
def lab(request, _lgnet_keep_captures):
    """A running lab for this test (lgnet.lab.Lab), torn down afterwards."""
    marker = request.node.get_closest_marker(MARKER)
    path = getattr(request, "param", None) or (marker.args[0] if marker and marker.args
                                               else None)
    if path is None:
        raise pytest.UsageError("the lab fixture needs a scenario: @pytest.mark.%s(path) or "
                                "indirect parametrization" % MARKER)
    with up(str(path)) as running:
        yield running
