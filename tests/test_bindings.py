"""The live dma_hash view: `lab.bindings()` and `lgnet bindings` against a running lab.

Three guests on lan0 — two bundled i386 kernels (lguest_net in C, under Unicorn) and a Python
guest that holds its receive buffers (tests/guests/holder.py) — so a used buffer can be seen
used, deterministically, and free again once the guest re-arms it."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
from scapy.layers.l2 import Ether

import lgnet
from lgnet import abi, netfile
from lgnet.fabric import keys
from lgnet.scenario import load_scenario

from conftest import ENV, REPO, lgnet_shm

pytestmark = pytest.mark.timeout(90)
SCENARIO = """\
networks: {lan0: {}}
guests:
  - {name: alpha, kernel: bundled, nets: [lan0], ip: 10.0.0.1/24}
  - {name: beta, kernel: bundled, nets: [lan0], ip: 10.0.0.2/24}
  - {name: holder, driver: python, nets: [lan0]}
"""


@pytest.fixture
def held_lab(tmp_path, monkeypatch):
    # The holder's kernel is a module of the tests: its launcher must find it on its path.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    path = tmp_path / "three.yaml"
    path.write_text(SCENARIO)
    scenario = load_scenario(str(path))
    release = tmp_path / "release"
    # The scenario language has no test kernels: swap the holder's in.
    scenario.guests[2] = dataclasses.replace(
        scenario.guests[2], kernel="python:tests.guests.holder", driver=None,
        args=("release=%s" % release,))
    with lgnet.up(scenario, capture=False) as lab:
        lab.wait_net("lan0")
        yield lab, release
    assert lgnet_shm() == []


def until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_every_guests_receive_array_is_on_the_chain_of_its_slots_key(held_lab):
    lab, _release = held_lab
    net = lab.net_file("lan0")
    st = os.stat(net)
    slot_of = {pid: s.slot for s in netfile.slot_table(net) for pid in s.pids}
    view = until(lambda: (lambda v: v if len(v.bindings) == 3 else None)(lab.bindings("lan0")))
    assert sorted(b.guest for b in view.bindings) == ["alpha", "beta", "holder"]
    # The bundled kernels also bind their console's input buffer, at a private key.
    assert sorted(b.guest for b in lab.bindings().bindings if b.net is None) == ["alpha", "beta"]
    for b in view.bindings:
        offset = abi.peer_key(0, slot_of[b.pid])          # the slot's key, in the file
        assert b.key == "lan0+%#x" % offset and b.net == "lan0"
        # The chain is jhash2 of the shared key, worked out here from the file itself.
        assert b.chain == keys.bucket(keys.Key(True, (st.st_dev, st.st_ino), offset))
        assert b.num_dmas == abi.NUM_NET_RX_BUFFERS == 8
        assert b.used_len == [0] * 8 and (b.free, b.used) == (8, 0)
        assert b.interrupt == 1                           # device 0's irq: index + 1
    assert {g.name for g in view.guests} == {"alpha", "beta", "holder"}
    assert [b.guest for b in lab.bindings("holder").bindings] == ["holder"]


def test_a_buffer_is_used_after_a_frame_arrives_and_free_once_rearmed(held_lab):
    lab, release = held_lab
    holder = until(lambda: lab.bindings("holder").bindings)[0]
    port = lab.port("lan0")
    frame = Ether(dst=abi.guest_mac(holder.guest_id)) / (b"held" * 20)
    port.send(frame)
    used = until(lambda: (lambda b: b if b.used else None)(lab.bindings("holder").bindings[0]))
    assert (used.free, used.used) == (7, 1)
    assert used.used_len[holder.next_dma] == len(bytes(frame))
    assert [g.irq_flags for g in lab.bindings("holder").guests] == [[holder.interrupt]]
    release.write_text("")
    again = until(lambda: (lambda b: b if not b.used else None)(
        lab.bindings("holder").bindings[0]))
    assert again.used_len == [0] * 8 and again.free == 8


def test_lgnet_bindings_prints_the_table_and_json_of_a_running_lab(held_lab):
    lab, _release = held_lab
    until(lambda: len(lab.bindings("lan0").bindings) == 3)
    run = lambda *a: subprocess.run([sys.executable, "-m", "lgnet", "bindings", *a],
                                    capture_output=True, text=True, env=ENV, timeout=30)
    table = run("--lab", lab.runtime)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.split("\n\n")[0].splitlines()
    assert header.split() == ["chain", "pos", "guest", "key", "array", "bufs", "free", "used",
                              "next", "irq", "used_len"]
    expected = lab.bindings()
    assert [r.split()[:4] for r in rows] == [[str(b.chain), str(b.position), b.guest, b.key]
                                             for b in expected.bindings]
    as_json = json.loads(run("--lab", lab.runtime, "--json", "beta").stdout)
    assert [(b["guest"], b["key"], b["free"]) for b in as_json["bindings"]
            if b["net"] == "lan0"] == [
        ("beta", b.key, 8) for b in lab.bindings("beta").bindings if b.net == "lan0"]
    watch = subprocess.Popen([sys.executable, "-m", "lgnet", "bindings", "--lab", lab.runtime,
                              "--watch", "0.2"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        frames = 0
        for line in watch.stdout:                 # each refresh starts with a clear screen
            frames += line.startswith("\033[H\033[2J")
            if frames == 3:
                break
    finally:
        watch.kill()
        watch.communicate()
    assert frames == 3
    wrong = run("--lab", lab.runtime, "nosuch")
    assert wrong.returncode == 2 and "no guest or net 'nosuch'" in wrong.stderr
