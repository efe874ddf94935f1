"""`lgnet shell`, driven through a real pty (pexpect) as a user at a terminal drives it:
prompt_toolkit draws the prompt with escape sequences, which are stripped before reading."""
import os
import re
import sys
import time

import pexpect
import pytest

from conftest import ENV, lgnet_shm

pytestmark = pytest.mark.timeout(180)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
SCENARIO = """\
# one of each kind of guest: the bundled i386 kernel and two Python drivers, all answering
networks: {lan0: {}}
guests:
  - {name: alpha, kernel: bundled, nets: [lan0], ip: 10.0.0.1/24}
  - {name: beta, driver: python, nets: [lan0], ip: 10.0.0.2/24}
  - {name: gamma, driver: python, nets: [lan0], ip: 10.0.0.3/24}
"""


class Terminal:
    def __init__(self, scenario, tmp_path):
        env = dict(ENV, XDG_STATE_HOME=str(tmp_path / "state"), TERM="xterm",
                   PROMPT_TOOLKIT_NO_CPR="1")           # pexpect answers no cursor queries
        self.child = pexpect.spawn(sys.executable, ["-m", "lgnet", "shell", str(scenario)],
                                   env=env, encoding="utf-8", timeout=60,
                                   dimensions=(50, 200))
        self.seen = ""
        self.wait("guests up")

    def wait(self, pattern: str) -> str:
        """Everything up to `pattern` (a regex over the text without escape codes)."""
        while True:
            found = re.search(pattern, self.seen)
            if found:
                before, self.seen = self.seen[:found.end()], self.seen[found.end():]
                return before
            self.child.expect(r".+")
            self.seen += ANSI.sub("", self.child.match.group(0))

    def run(self, command: str, until: str) -> str:
        self.wait("lgnet>")
        self.child.sendline(command)
        return self.wait(until)


def pids_in(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\w+\s+[\w ]+?\s+(\d+)\s+lan0", text, re.M)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_shell_drives_a_lab_and_leaves_nothing_behind(tmp_path):
    scenario = tmp_path / "mixed.yaml"
    scenario.write_text(SCENARIO)
    term = Terminal(scenario, tmp_path)

    nodes = term.run("nodes", r"gamma .*\n")
    assert re.search(r"alpha\s+bundled kernel\s+\d+\s+lan0\s+10\.0\.0\.1/24\s+running", nodes)
    assert re.search(r"beta\s+python driver\s+\d+\s+lan0", nodes)
    pids = pids_in(nodes)
    assert len(pids) == 3

    pingall = term.run("pingall", r"Results: .*\n")
    assert "lan0 -> alpha beta gamma" in pingall
    assert "*** Results: 0% dropped (3/3 received)" in pingall

    console = term.run("console alpha", r"Ctrl-\] detaches\)\n")
    term.wait(r"lguest: ready\n")                 # the bundled kernel's boot, shown again
    term.child.send("hi there\r")                 # its console echoes what it is sent
    term.wait(r"hi there")
    term.child.send("\x1d")                       # Ctrl-]
    term.wait(r"detached from alpha")
    assert "alpha's console" in console

    ping = term.run("beta ping 10.0.0.1 2", r"packet loss\n")
    assert "2 packets transmitted, 2 received, 0% packet loss" in ping
    refused = term.run("alpha ping 10.0.0.2", r"cannot ping.*\n")
    assert "its kernel (the bundled kernel) takes no commands" in refused

    killed = term.run("kill gamma", r"gamma killed.*\n")
    assert "killed by SIGKILL" in killed
    lossy = term.run("pingall", r"Results: .*\n")
    assert "lan0 -> alpha beta X" in lossy
    assert "gamma (10.0.0.3 on lan0): no ARP reply" in lossy
    assert "*** Results: 33% dropped (2/3 received)" in lossy

    bindings = term.run("bindings lan0", r"pending DMA\n(.*\n){3}")
    assert re.search(r"alpha\s+lan0\+0x[0-9a-f]+\s+0x[0-9a-f]{8}\s+8\s+8\s+0", bindings)

    term.run("nosuch", r"unknown command 'nosuch'")
    term.wait("lgnet>")
    term.child.sendline("exit")
    term.child.expect(pexpect.EOF)
    term.seen += ANSI.sub("", term.child.before)
    assert re.search(r"gamma\s+(\d+\s+){6}killed by SIGKILL", term.seen)
    assert re.search(r"alpha\s+(\d+\s+){6}stopped by the lab", term.seen)
    term.child.close()
    assert term.child.exitstatus == 1             # a guest was killed: as lgnet up says
    assert not [pid for pid in pids if alive(pid)]
    assert lgnet_shm() == []


def test_source_runs_a_file_of_commands_and_ctrl_d_leaves(tmp_path):
    scenario = tmp_path / "mixed.yaml"
    scenario.write_text(SCENARIO)
    commands = tmp_path / "commands"
    commands.write_text("# a comment\nnet\nslots lan0\n")
    term = Terminal(scenario, tmp_path)
    out = term.run("source %s" % commands, r"holder pids\n(.*\n){3}")
    assert re.search(r"lgnet> net\n.*guest\s+net\s+slot\s+mac\s+state", out)
    assert re.search(r"beta\s+lan0\s+\d\s+02:00:0\d:00:00:00\s+up", out)
    term.wait("lgnet>")
    # Tab completes the command, then the guest (completion runs in the background: give
    # each Tab its moment, as a typist does)
    for keys in ("con\t", " ga\t", "\r"):
        term.child.send(keys)
        time.sleep(0.5)
    term.wait(r"gamma's console \(Ctrl-\] detaches\)")
    term.child.send("\x1d")
    term.wait(r"detached from gamma")
    term.wait("lgnet>")
    term.child.sendcontrol("d")
    term.child.expect(pexpect.EOF)
    term.child.close()
    assert term.child.exitstatus == 0
    history = (tmp_path / "state" / "lgnet" / "shell_history").read_text()
    assert "\n+source %s\n" % commands in history            # prompt_toolkit's FileHistory


def test_sigterm_tears_the_lab_down_with_the_real_counts(tmp_path):
    scenario = tmp_path / "mixed.yaml"
    scenario.write_text(SCENARIO)
    term = Terminal(scenario, tmp_path)
    pids = pids_in(term.run("nodes", r"gamma .*\n"))
    term.run("pingall", r"Results: 0% dropped .*\n")
    term.wait("lgnet>")
    term.child.kill(15)
    term.child.expect(pexpect.EOF)
    table = ANSI.sub("", term.child.before)
    term.child.close()
    assert term.child.exitstatus == 130
    for name in ("alpha", "beta", "gamma"):      # each answered pingall's ARP and echo
        row = re.search(r"^%s\s+(\d+)\s+\d+\s+(\d+)\s.*stopped by the lab$" % name, table, re.M)
        assert row and int(row.group(1)) >= 2 and int(row.group(2)) >= 2, table
    assert not [pid for pid in pids if alive(pid)]
    assert lgnet_shm() == []
