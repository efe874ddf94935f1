"""scenario.py: YAML -> model, and one exact message (file:line: key: what) per mistake."""
import shutil
import textwrap
from pathlib import Path

import pytest

from lgnet.errors import LgnetError
from lgnet.guest.images import BUNDLED_KERNEL
from lgnet.scenario import Expectation, GuestSpec, Network, Scenario, Step, load_scenario


@pytest.fixture
def lab(tmp_path):
    """A scenario directory with the input files a guest may name (the kernel: a copy of
    the bundled one, since a scenario's kernel is read when the scenario is loaded)."""
    shutil.copy(BUNDLED_KERNEL, tmp_path / "vmlinux")
    for name in ("disk.img", "initrd.img"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    return tmp_path


def write(lab: Path, text: str) -> Path:
    path = lab / "x.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(path) -> str:
    with pytest.raises(LgnetError) as caught:
        load_scenario(path)
    return str(caught.value)


GOOD = """
duration: 10
networks:
  lan0: {}
  lan1:
    file: nets/lan1
  lan2:
guests:
  - name: alpha
    kernel: vmlinux
    mem: 64
    nets: [lan0, lan1]
    cmdline: "ip=10.0.0.1/24  ping=10.0.0.2"
    block: disk.img
    initrd: initrd.img
  - name: beta_2
    driver: python
    nets: [lan1, lan0]
    promisc: true
    args: [ip=10.0.0.2/24]
    script:
      - {send: broadcast, net: lan0, count: 3}
      - {send: peers, net: lan1}
      - {wait: 1.5}
  - name: gamma
    driver: python
expect:
  - {from: alpha, to: beta_2, match: "icmp and src host 10.0.0.1", within: 5}
  - {net: lan0, count: 0}
  - to: gamma
    match: arp
    min: 2
"""


def test_good_scenario_becomes_the_model(lab):
    path = write(lab, GOOD)
    assert load_scenario(path) == Scenario(
        path=path,
        duration=10.0,
        networks={"lan0": Network("lan0"), "lan1": Network("lan1", lab / "nets" / "lan1"),
                  "lan2": Network("lan2")},
        guests=[
            GuestSpec(name="alpha", mem_mb=64, kernel=lab / "vmlinux", nets=("lan0", "lan1"),
                      args=("ip=10.0.0.1/24", "ping=10.0.0.2"), block=lab / "disk.img",
                      initrd=lab / "initrd.img"),
            GuestSpec(name="beta_2", driver="python", nets=("lan1", "lan0"), promisc=True,
                      args=("ip=10.0.0.2/24",),
                      script=(Step("send", send="broadcast", net="lan0", count=3),
                              Step("send", send="peers", net="lan1", count=1),
                              Step("wait", wait=1.5))),
            GuestSpec(name="gamma", driver="python"),
        ],
        expect=[Expectation("%s:27" % path, sender="alpha", receiver="beta_2",
                            match="icmp and src host 10.0.0.1", within=5.0),
                Expectation("%s:28" % path, net="lan0", count=0),
                Expectation("%s:29" % path, receiver="gamma", match="arp", least=2)])


def test_defaults(lab):
    scenario = load_scenario(write(lab, """
        guests:
          - {name: solo, driver: python}
        """))
    assert scenario.duration is None and scenario.networks == {} and scenario.expect == []
    assert scenario.guests == [GuestSpec(name="solo", mem_mb=32, driver="python")]


def test_relative_paths_follow_the_scenario_directory_not_the_cwd(lab, monkeypatch):
    write(lab, "guests:\n  - {name: a, kernel: vmlinux}\n")
    monkeypatch.chdir(lab.parent)
    scenario = load_scenario(Path(lab.name) / "x.yaml")
    assert scenario.guests[0].kernel == lab / "vmlinux"


def test_missing_file(lab):
    path = lab / "nope.yaml"
    assert error_of(path) == "%s: cannot read scenario: No such file or directory" % path


def test_not_yaml(lab):
    path = write(lab, "guests:\n  - name: a\n    driver: [python\n")
    assert error_of(path).startswith("%s:4: not valid YAML: " % path)


def test_empty_file(lab):
    path = write(lab, "# nothing here\n")
    assert error_of(path) == "%s:1: (top level): must be a mapping, got nothing" % path


def test_top_level_not_a_mapping(lab):
    path = write(lab, "- name: a\n")
    assert error_of(path) == "%s:1: (top level): must be a mapping, got a list" % path


def test_unsafe_tag_is_refused(lab):
    path = write(lab, "duration: !!python/object:os.system 1\nguests: []\n")
    assert error_of(path).startswith(
        "%s:1: duration: not valid YAML: could not determine a constructor" % path)


# Each case: the YAML, the line and the rest of the message ("key: what").
DRIVER = "  - name: a\n    driver: python\n"
NET_AB = ("guests:\n  - {name: a, driver: python, nets: [lan0]}\n"
          "  - {name: b, driver: python, nets: [lan0]}\n"
          "networks:\n  lan0: {}\n\n\n")
BAD = {
    "unknown top-level key": (
        "guests:\n" + DRIVER + "durration: 3\n",
        4, "durration: unknown key (did you mean 'duration'?) (allowed: duration, seed, "
           "networks, guests, impair, events, expect, first_guest_id)"),
    "guests missing": (
        "duration: 3\n",
        1, "guests: is required"),
    "guests empty": (
        "guests: []\n",
        1, "guests: must be a list of 1 to 682 guests, got an empty list"),
    "guests not a list": (
        "guests: alpha\n",
        1, "guests: must be a list of 1 to 682 guests, got 'alpha'"),
    "duplicate top-level key": (
        "guests:\n" + DRIVER + "guests:\n" + DRIVER,
        4, "guests: duplicate key 'guests' (first at line 1)"),
    "duration zero": (
        "duration: 0\nguests:\n" + DRIVER,
        1, "duration: must be a number of seconds above 0 and at most 86400, got 0"),
    "duration a word": (
        "duration: ten\nguests:\n" + DRIVER,
        1, "duration: must be a number of seconds above 0 and at most 86400, got 'ten'"),
    "duplicate network names": (
        "networks:\n  lan0: {}\n  lan0: {}\nguests:\n" + DRIVER,
        3, "networks.lan0: duplicate key 'lan0' (first at line 2)"),
    "bad network name": (
        "networks:\n  Lan0: {}\nguests:\n" + DRIVER,
        2, "networks.Lan0: must be a name matching [a-z][a-z0-9_-]{0,30}, got 'Lan0'"),
    "networks not a mapping": (
        "networks: [lan0]\nguests:\n" + DRIVER,
        1, "networks: must be a mapping, got a list"),
    "network unknown key": (
        "networks:\n  lan0: {path: x}\nguests:\n" + DRIVER,
        2, "networks.lan0.path: unknown key (allowed: file, uplink)"),
    "uplink without bridge or tap": (
        "networks:\n  lan0:\n    uplink: {}\nguests:\n" + DRIVER,
        3, "networks.lan0.uplink: needs 'bridge' or 'tap' (or both)"),
    "uplink unknown key": (
        "networks:\n  lan0:\n    uplink: {bridge: br0, gre: 1}\nguests:\n" + DRIVER,
        3, "networks.lan0.uplink.gre: unknown key (allowed: bridge, tap, vxlan)"),
    "uplink bridge not an interface name": (
        "networks:\n  lan0:\n    uplink: {bridge: my bridge}\nguests:\n" + DRIVER,
        3, "networks.lan0.uplink.bridge: must be an interface name (1 to 15 characters, no "
           "'/', ':' or spaces), got 'my bridge'"),
    "uplink vxlan without a bridge": (
        "networks:\n  lan0:\n    uplink:\n      tap: lg0\n      vxlan: {id: 1}\n"
        "guests:\n" + DRIVER,
        5, "networks.lan0.uplink.vxlan: only allowed with 'bridge'"),
    "uplink vxlan id out of range": (
        "networks:\n  lan0:\n    uplink:\n      bridge: br0\n"
        "      vxlan: {id: 16777216, remote: 10.254.0.2, dev: veth0}\nguests:\n" + DRIVER,
        5, "networks.lan0.uplink.vxlan.id: must be a VXLAN network identifier, a whole number "
           "from 0 to 16777215, got 16777216"),
    "uplink vxlan remote not an address": (
        "networks:\n  lan0:\n    uplink:\n      bridge: br0\n"
        "      vxlan: {id: 42, remote: hostb, dev: veth0}\nguests:\n" + DRIVER,
        5, "networks.lan0.uplink.vxlan.remote: must be the IPv4 address of the tunnel's other "
           "end, got 'hostb'"),
    "uplink vxlan without dev": (
        "networks:\n  lan0:\n    uplink:\n      bridge: br0\n"
        "      vxlan: {id: 42, remote: 10.254.0.2}\nguests:\n" + DRIVER,
        5, "networks.lan0.uplink.vxlan.dev: is required"),
    "first guest id too high": (
        "first_guest_id: 65281\nguests:\n" + DRIVER,
        1, "first_guest_id: must be a guest id from 0 to 64854 (ids are 16 bits, a Host has "
           "682), got 65281"),
    "network file not a string": (
        "networks:\n  lan0: {file: [x]}\nguests:\n" + DRIVER,
        2, "networks.lan0.file: must be a string, got a list"),
    "two networks on one file": (
        "networks:\n  lan0: {file: net}\n  lan1: {file: ./net}\nguests:\n" + DRIVER,
        3, "networks.lan1.file: duplicate net file '{lab}/net' (first at line 2)"),
    "guest not a mapping": (
        "guests:\n  - alpha\n",
        2, "guests[0]: must be a mapping, got 'alpha'"),
    "guest unknown key": (
        "guests:\n" + DRIVER + "    memory: 32\n",
        4, "guests[0].memory: unknown key (allowed: name, mem, kernel, driver, nets, promisc, "
           "ip, cmdline, args, block, initrd, script, gdb)"),
    "guest key not a string": (
        "guests:\n" + DRIVER + "    1: 32\n",
        4, "guests[0]: must be a string key, got 1"),
    "guest name missing": (
        "guests:\n  - driver: python\n",
        2, "guests[0].name: is required"),
    "guest name bad": (
        "guests:\n  - name: 9lives\n    driver: python\n",
        2, "guests[0].name: must be a name matching [a-z][a-z0-9_-]{0,30}, got '9lives'"),
    "guest name too long": (
        "guests:\n  - name: %s\n    driver: python\n" % ("a" * 32),
        2, "guests[0].name: must be a name matching [a-z][a-z0-9_-]{0,30}, got '%s'" % ("a" * 32)),
    "duplicate guest names": (
        "guests:\n" + DRIVER + DRIVER,
        4, "guests[1].name: duplicate guest name 'a' (first at line 2)"),
    "mem a word": (
        "guests:\n" + DRIVER + "    mem: lots\n",
        4, "guests[0].mem: must be a whole number of megabytes between 1 and 1024, got 'lots'"),
    "mem too big": (
        "guests:\n" + DRIVER + "    mem: 2048\n",
        4, "guests[0].mem: must be a whole number of megabytes between 1 and 1024, got 2048"),
    "mem zero": (
        "guests:\n" + DRIVER + "    mem: 0\n",
        4, "guests[0].mem: must be a whole number of megabytes between 1 and 1024, got 0"),
    "mem fractional": (
        "guests:\n" + DRIVER + "    mem: 1.5\n",
        4, "guests[0].mem: must be a whole number of megabytes between 1 and 1024, got 1.5"),
    "mem boolean": (
        "guests:\n" + DRIVER + "    mem: yes\n",
        4, "guests[0].mem: must be a whole number of megabytes between 1 and 1024, got True"),
    "neither kernel nor driver": (
        "guests:\n  - name: a\n    mem: 32\n",
        2, "guests[0]: needs 'kernel' or 'driver'"),
    "both kernel and driver": (
        "guests:\n  - name: a\n    kernel: vmlinux\n    driver: python\n",
        4, "guests[0].driver: cannot be combined with 'kernel' (line 3)"),
    "unknown driver": (
        "guests:\n  - name: a\n    driver: c\n",
        3, "guests[0].driver: must be one of 'python', got 'c'"),
    "kernel missing": (
        "guests:\n  - name: a\n    kernel: bzImage\n",
        3, "guests[0].kernel: no such file: {lab}/bzImage"),
    "kernel near miss": (
        "guests:\n  - name: a\n    kernel: bundle\n",
        3, "guests[0].kernel: no such file: {lab}/bundle (did you mean 'bundled'?)"),
    "kernel is text": (
        "guests:\n  - name: a\n    kernel: x.yaml\n# long enough to be read as a bzImage\n",
        3, "guests[0].kernel: {lab}/x.yaml is not an lguest kernel (an i386 vmlinux or a "
           "bzImage): it is text ('guests:') (Could not find kernel in bzImage)"),
    "kernel too short": (
        "guests:\n  - name: a\n    kernel: disk.img\n",
        3, "guests[0].kernel: {lab}/disk.img is not an lguest kernel (an i386 vmlinux or a "
           "bzImage): it is data starting with zero bytes (Reading kernel: the file is too "
           "short)"),
    "kernel is a 64-bit program": (
        "guests:\n  - name: a\n    kernel: /bin/true\n",
        3, "guests[0].kernel: /bin/true is not an lguest kernel (an i386 vmlinux or a bzImage): "
           "it is a 64-bit x86-64 ELF file (Malformed elf header)"),
    "driver near miss": (
        "guests:\n  - name: a\n    driver: pyhton\n",
        3, "guests[0].driver: must be one of 'python', got 'pyhton' (did you mean 'python'?)"),
    "guest key near miss": (
        "guests:\n  - nmae: a\n    driver: python\n",
        2, "guests[0].nmae: unknown key (did you mean 'name'?) (allowed: name, mem, kernel, "
           "driver, nets, promisc, ip, cmdline, args, block, initrd, script, gdb)"),
    "kernel is a directory": (
        "guests:\n  - name: a\n    kernel: .\n",
        3, "guests[0].kernel: no such file: {lab}"),
    "block missing": (
        "guests:\n" + DRIVER + "    block: nodisk.img\n",
        4, "guests[0].block: no such file: {lab}/nodisk.img"),
    "initrd missing": (
        "guests:\n  - name: a\n    kernel: vmlinux\n    initrd: none.img\n",
        4, "guests[0].initrd: no such file: {lab}/none.img"),
    "initrd with driver": (
        "guests:\n" + DRIVER + "    initrd: initrd.img\n",
        4, "guests[0].initrd: only allowed with 'kernel'"),
    "script with kernel": (
        "guests:\n  - name: a\n    kernel: vmlinux\n    script: []\n",
        4, "guests[0].script: only allowed with 'driver'"),
    "promisc with kernel": (
        "guests:\n  - name: a\n    kernel: vmlinux\n    promisc: true\n",
        4, "guests[0].promisc: only allowed with 'driver'"),
    "promisc not a boolean": (
        "guests:\n" + DRIVER + "    promisc: maybe\n",
        4, "guests[0].promisc: must be true or false, got 'maybe'"),
    "more nets than a guest has devices": (
        "networks: {%s}\nguests:\n" % ", ".join("n%d: {}" % i for i in range(16))
        + DRIVER + "    nets: [%s]\n" % ", ".join("n%d" % i for i in range(16)),
        5, "guests[0].nets: 16 devices and the console: too many devices (a guest has at most "
        "16, the console included)"),
    "a block device one too many": (
        "networks: {%s}\nguests:\n" % ", ".join("n%d: {}" % i for i in range(15))
        + DRIVER + "    nets: [%s]\n    block: disk.img\n" % ", ".join("n%d" % i
                                                                   for i in range(15)),
        6, "guests[0].block: 16 devices and the console: too many devices (a guest has at "
        "most 16, the console included)"),
    "nets not a list": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: lan0\n",
        5, "guests[0].nets: must be a list of network names, got 'lan0'"),
    "unknown network": (
        "networks: {lan0: {}, lan1: {}}\nguests:\n" + DRIVER + "    nets: [lan0, lan9]\n",
        5, "guests[0].nets[1]: must be one of the networks ('lan0', 'lan1'), got 'lan9'"),
    "network with no networks defined": (
        "guests:\n" + DRIVER + "    nets: [lan0]\n",
        4, "guests[0].nets[0]: must be one of the networks (none), got 'lan0'"),
    "network listed twice": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets:\n      - lan0\n      - lan0\n",
        7, "guests[0].nets[1]: duplicate network 'lan0' (first at line 6)"),
    "cmdline and args": (
        "guests:\n" + DRIVER + "    cmdline: a b\n    args: [a, b]\n",
        5, "guests[0].args: cannot be combined with 'cmdline' (line 4)"),
    "cmdline not a string": (
        "guests:\n" + DRIVER + "    cmdline: [a]\n",
        4, "guests[0].cmdline: must be a string, got a list"),
    "args item not a string": (
        "guests:\n" + DRIVER + "    args: [a, 3]\n",
        4, "guests[0].args[1]: must be a string, got 3"),
    "script not a list": (
        "guests:\n" + DRIVER + "    script: {wait: 1}\n",
        4, "guests[0].script: must be a list of steps, got a mapping"),
    "step unknown key": (
        "guests:\n" + DRIVER + "    script:\n      - {sleep: 1}\n",
        5, "guests[0].script[0].sleep: unknown key (allowed: send, net, count, wait, ping)"),
    "step with neither send nor wait": (
        "guests:\n" + DRIVER + "    script:\n      - {}\n",
        5, "guests[0].script[0]: needs 'send', 'wait' or 'ping'"),
    "step with send and wait": (
        "guests:\n" + DRIVER + "    script:\n      - {send: peers, wait: 1}\n",
        5, "guests[0].script[0].wait: cannot be combined with 'send' (line 5)"),
    "step bad send": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n"
        "    script:\n      - {send: everyone, net: lan0}\n",
        7, "guests[0].script[0].send: must be one of 'broadcast', 'peers', got 'everyone'"),
    "step without net": (
        "guests:\n" + DRIVER + "    script:\n      - {send: peers}\n",
        5, "guests[0].script[0].net: is required"),
    "step on a net the guest is not on": (
        "networks: {lan0: {}, lan1: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n"
        "    script:\n      - {send: peers, net: lan1}\n",
        7, "guests[0].script[0].net: must be one of this guest's nets ('lan0'), got 'lan1'"),
    "step count zero": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n"
        "    script:\n      - {send: peers, net: lan0, count: 0}\n",
        7, "guests[0].script[0].count: "
           "must be a whole number of frames between 1 and 65536, got 0"),
    "count with wait": (
        "guests:\n" + DRIVER + "    script:\n      - {wait: 1, count: 2}\n",
        5, "guests[0].script[0].count: only allowed with 'send' or 'ping'"),
    "wait negative": (
        "guests:\n" + DRIVER + "    script:\n      - wait: -1\n",
        5, "guests[0].script[0].wait: "
           "must be a number of seconds above 0 and at most 86400, got -1"),
    "expect not a list": (
        "guests:\n" + DRIVER + "expect: all good\n",
        4, "expect: must be a list of expectations, got 'all good'"),
    "expect item not a mapping": (
        "guests:\n" + DRIVER + "expect:\n  - 42\n",
        5, "expect[0]: must be a mapping, got 42"),
    "expect bad filter": (
        "guests:\n" + DRIVER + "expect:\n  - {match: 'udp or'}\n",
        5, "expect[0].match: filter 'udp or': libpcap: can't parse filter expression: "
           "syntax error"),
    "expect unknown guest": (
        "guests:\n" + DRIVER + "expect:\n  - {from: b}\n",
        5, "expect[0].from: must be one of the guests ('a'), got 'b'"),
    "expect unknown net": (
        "guests:\n" + DRIVER + "expect:\n  - {net: lan0}\n",
        5, "expect[0].net: must be one of the networks (none), got 'lan0'"),
    "expect count negative": (
        "guests:\n" + DRIVER + "expect:\n  - {count: -1}\n",
        5, "expect[0].count: must be a whole number of deliveries between 0 and 1048576, "
           "got -1"),
    "expect within zero": (
        "guests:\n" + DRIVER + "expect:\n  - {within: 0}\n",
        5, "expect[0].within: must be a number of seconds above 0 and at most 86400, got 0"),
    "ip not an address": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n    ip: 10.0.0.300/24\n",
        6, "guests[0].ip: must be an IPv4 address with an optional prefix (A.B.C.D/N), "
           "got '10.0.0.300/24'"),
    "more addresses than nets": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n"
        "    ip: [10.0.0.1, 10.0.1.1]\n",
        6, "guests[0].ip: gives 2 addresses for 1 nets"),
    "ip and ip= in args": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n    ip: 10.0.0.1\n"
        "    args: [ip=10.0.0.2]\n",
        6, "guests[0].ip: cannot be combined with an ip= in 'cmdline' or 'args'"),
    "ping without an address": (
        "guests:\n" + DRIVER + "    script:\n      - {ping: 10.0.0.1}\n",
        5, "guests[0].script[0].ping: needs an address of this guest's own: give it 'ip'"),
    "ping not an address": (
        "guests:\n" + DRIVER + "    script:\n      - {ping: alpha}\n",
        5, "guests[0].script[0].ping: must be an IPv4 address, got 'alpha'"),
    "gdb on a python guest": (
        "guests:\n" + DRIVER + "    gdb: 1234\n",
        4, "guests[0].gdb: only allowed with 'kernel'"),
    "gdb not a port": (
        "guests:\n  - {name: a, kernel: vmlinux, gdb: 65536}\n",
        2, "guests[0].gdb: must be a TCP port from 0 (any free one) to 65535, got 65536"),
    "gdb port twice": (
        "guests:\n  - {name: a, kernel: vmlinux, gdb: 1234}\n"
        "  - {name: b, kernel: vmlinux, gdb: 0}\n  - {name: c, kernel: vmlinux, gdb: 1234}\n",
        4, "guests[2].gdb: duplicate gdb port '1234' (first at line 2)"),
    "ping with a net": (
        "networks: {lan0: {}}\nguests:\n" + DRIVER + "    nets: [lan0]\n    ip: 10.0.0.2\n"
        "    script:\n      - {ping: 10.0.0.1, net: lan0}\n",
        8, "guests[0].script[0].net: only allowed with 'send'"),
    # --- impairments and the timeline (lgnet.fabric.impair checks every value) ---
    "loss above 1": (
        NET_AB + "impair:\n  - {net: lan0, src: a,\n     loss: 1.5}\n",
        10, "impair[0].loss: must be a probability from 0 to 1, got 1.5"),
    "rate unreadable": (
        NET_AB + "impair:\n  - net: lan0\n    rate: fast\n",
        10, "impair[0].rate: must be a rate above 0: bit/s as a number, or a string like "
            "'10mbit', '500kbit', '100fps'; got 'fast'"),
    "limit without rate": (
        NET_AB + "impair:\n  - net: lan0\n    loss: 0.1\n    limit: 10\n",
        11, "impair[0].limit: only allowed with 'rate'"),
    "impair on an unknown guest": (
        NET_AB + "impair:\n  - {net: lan0, dst: zed, delay: 5}\n",
        9, "impair[0].dst: must be one of the guests ('a', 'b'), got 'zed'"),
    "impair with nothing": (
        NET_AB + "impair:\n  - {net: lan0, src: a}\n",
        9, "impair[0]: needs at least one impairment (loss, burst, delay, jitter, reorder, "
           "duplicate, corrupt, rate, limit, down)"),
    "unknown impairment": (
        NET_AB + "impair:\n  - {net: lan0, lossy: 0.1}\n",
        9, "impair[0].lossy: unknown key (did you mean 'loss'?) (allowed: net, src, dst, loss, burst, delay, jitter, "
           "reorder, duplicate, corrupt, rate, limit, down)"),
    "event link not a pair": (
        NET_AB + "events:\n  - {at: 1, link: [a], down: true}\n",
        9, "events[0].link: must be a list of 2 to 2 a guest and a net, got a list"),
    "event link on a net the guest is not on": (
        NET_AB + "  lan1: {}\nevents:\n  - {at: 1, link: [a, lan1], down: true}\n",
        10, "events[0].link: a is not on lan1"),
    "event without a kind": (
        NET_AB + "events:\n  - {at: 1}\n",
        9, "events[0]: needs 'link', 'impair', 'kill', 'restart', 'partition' or 'heal'"),
    "event time negative": (
        NET_AB + "events:\n  - {at: -1, heal: true}\n",
        9, "events[0].at: must be a number of seconds from 0 to 86400, got -1"),
    "event bad impairment": (
        NET_AB + "events:\n  - at: 2\n    impair: {net: lan0, delay: -5}\n",
        10, "events[0].impair.delay: must be a number of milliseconds from 0 to 60000, got -5"),
    "partition of one group": (
        NET_AB + "events:\n  - {at: 1, partition: [[a, b]]}\n",
        9, "events[0].partition: must be a list of 2 or more groups of guests, got a list"),
    "seed not a number": (
        NET_AB + "seed: lucky\n",
        8, "seed: must be a whole number of (a seed) between 0 and 18446744073709551615, "
           "got 'lucky'"),
}


def test_addresses_and_ping_steps(lab):
    from lgnet.lab import Lab
    scenario = load_scenario(write(lab, """
        networks: {lan0: {}, lan1: {}}
        guests:
          - name: alpha
            driver: python
            nets: [lan0, lan1]
            ip: [10.0.0.1/24, 10.0.1.1]
            script:
              - {ping: 10.0.0.2, count: 3}
          - {name: beta, driver: python, nets: [lan0], ip: 10.0.0.2/16}
          - {name: gamma, kernel: vmlinux, nets: [lan1], ip: 10.0.1.2/24}
        """))
    alpha, beta, gamma = scenario.guests
    assert alpha.ip == ("10.0.0.1/24", "10.0.1.1") and beta.ip == ("10.0.0.2/16",)
    assert alpha.script == (Step("ping", ping="10.0.0.2", count=3),)
    lab_ = Lab(scenario)
    try:
        assert lab_.launch_command(alpha)[-2:] == [
            "ip=10.0.0.1/24,10.0.1.1", "script=await:0:1:10,await:1:1:10,ping:10.0.0.2:3"]
        # An addressed Python guest without a script serves: no script= at all.
        assert lab_.launch_command(beta)[-2:] == ["python:", "ip=10.0.0.2/16"]
        assert lab_.launch_command(gamma)[-1] == "ip=10.0.1.2/24"
    finally:
        lab_.stop()


def test_a_gdb_port_goes_to_the_launcher(lab):
    from lgnet.lab import Lab
    scenario = load_scenario(write(lab, """
        guests:
          - {name: alpha, kernel: vmlinux, gdb: 1234}
          - {name: beta, kernel: vmlinux, gdb: 0}
          - {name: gamma, kernel: vmlinux}
        """))
    assert [g.gdb for g in scenario.guests] == [1234, 0, None]
    lab_ = Lab(scenario)
    try:
        commands = [lab_.launch_command(g) for g in scenario.guests]
    finally:
        lab_.stop()
    assert [c[c.index("--gdb") + 1] if "--gdb" in c else None for c in commands] == [
        "1234", "0", None]


@pytest.mark.parametrize("text, line, message", BAD.values(), ids=BAD.keys())
def test_bad_scenario(lab, text, line, message):
    path = write(lab, text)
    assert error_of(path) == "%s:%d: %s" % (path, line, message.replace("{lab}", str(lab)))


def test_an_uplink_becomes_the_tunnet_of_its_launcher(lab):
    from lgnet.guest.devices.tun import TunSpec, Vxlan, parse_tunnet
    scenario = load_scenario(write(lab, """\
        first_guest_id: 256
        networks:
          lan0:
            uplink: {bridge: br0, vxlan: {id: 42, remote: 10.254.0.2, dev: veth0}}
          lan1:
            uplink: {tap: lg1}
        guests:
          - {name: a, driver: python, nets: [lan0, lan1]}
        """))
    assert scenario.first_guest_id == 256
    uplink = scenario.networks["lan0"].uplink
    assert uplink == TunSpec(bridge="br0", vxlan=Vxlan(42, "10.254.0.2", "veth0"))
    assert uplink.arg == "bridge:br0,vxlan:42,remote:10.254.0.2,dev:veth0"
    assert parse_tunnet(uplink.arg) == uplink and uplink.vxlan.name == "lgvx42"
    assert scenario.networks["lan1"].uplink == TunSpec(tap="lg1")


def test_the_command_lines_uplink_replaces_the_files(lab):
    from lgnet.guest.devices.tun import TunSpec
    from lgnet.uplink import with_uplinks
    path = write(lab, "networks:\n  lan0:\n    uplink: {bridge: br0}\nguests:\n" + DRIVER)
    scenario = with_uplinks(load_scenario(path), ["lan0=tap:lg0"])
    assert scenario.networks["lan0"].uplink == TunSpec(tap="lg0")
    for option, message in [
            ("lan9=bridge:br0", "--uplink lan9=bridge:br0: no network 'lan9' in %s (networks: "
                                "lan0)" % path),
            ("lan0", "--uplink wants NET=bridge:NAME or NET=tap:NAME, got 'lan0'"),
            ("lan0=10.0.0.1/24", "--uplink lan0=10.0.0.1/24: wants bridge:NAME or tap:NAME, "
                                 "got '10.0.0.1/24'"),
            ("lan0=bridge:br0,vxlan:42", "--uplink lan0=bridge:br0,vxlan:42: a VXLAN port needs "
                                         "remote:, dev:")]:
        with pytest.raises(LgnetError) as caught:
            with_uplinks(load_scenario(path), [option])
        assert str(caught.value) == message


def test_expect_may_name_an_uplink(lab):
    scenario = load_scenario(write(lab, """\
        networks:
          lan0: {uplink: {bridge: br0}}
        guests:
          - {name: kilo, driver: python, nets: [lan0]}
        expect:
          - {from: "uplink:lan0", to: kilo, match: icmp, min: 1}
        """))
    assert scenario.expect[0].sender == "uplink:lan0"
