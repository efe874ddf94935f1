"""Shared pieces of the multi-process tests: a broker process per test, launcher processes
that are always reaped, and a look at /dev/shm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lgnet import wire
from lgnet.fabric import fastpath

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def lgnet_shm() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if "lgnet" in name]


@pytest.fixture(params=["python", "compiled"])
def both_paths(request, monkeypatch):
    """Run a test once on each per-frame path (DESIGN rule 9): every Engine the test builds
    without saying takes the Python reference, then the compiled path."""
    module = fastpath.compiled_module()
    if request.param == "compiled" and module is None:
        pytest.skip("the compiled per-frame path was not built: %s" % fastpath.describe()[1])
    monkeypatch.setattr(fastpath, "default", lambda: module if request.param == "compiled" else None)
    return request.param


@pytest.fixture
def broker(tmp_path):
    path = str(tmp_path / "run" / "broker.sock")
    proc = subprocess.Popen([sys.executable, "-m", "lgnet", "broker", "--socket", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    assert b"listening on" in proc.stdout.readline()
    yield path
    if proc.poll() is None:
        proc.terminate()
        proc.wait(5)
    proc.stdout.close()


class Guests:
    """Launcher processes started by a test, all reaped at the end."""

    def __init__(self, broker_path: str):
        self.broker_path = broker_path
        self.procs: list[subprocess.Popen] = []

    def launch(self, *nets, kernel="python:", args=(), block=None,
               options=()) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "lgnet", "launch", "--broker", self.broker_path,
               "--no-console-input", *options]
        for net in nets:
            cmd += ["--sharenet", str(net)]
        if block is not None:
            cmd += ["--block", str(block)]
        proc = subprocess.Popen(cmd + ["16", kernel, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        self.procs.append(proc)
        return proc

    def finish(self, proc, timeout=30) -> str:
        out, _ = proc.communicate(timeout=timeout)
        return out.decode()

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def guests(broker):
    g = Guests(broker)
    yield g
    g.close()


def stats(broker_path: str) -> list[dict]:
    channel = wire.Channel(broker_path)
    try:
        return json.loads(channel.call(wire.OP_STATS).tail)
    finally:
        channel.close()
