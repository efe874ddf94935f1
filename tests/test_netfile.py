"""netfile.py with real locks held by real processes."""
import fcntl
import os
import stat
import struct
import subprocess
import sys

import pytest

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.netfile import (NetFile, SlotInfo, clear_stale_slots, file_identity, map_netfile,
                           open_netfile, reserve_slot, slot_table)

# A launcher in miniature: reserve a slot, maybe write a MAC through the mapping, maybe open
# and close the file again, say which slot, then hold it until stdin closes (or SIGKILL).
HOLDER = r"""
import os, sys
from lgnet.netfile import NetFile
path, mac, mode = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
net = NetFile.reserve(path)
if mac:
    net.mmap[6 * net.slot:6 * net.slot + 6] = mac
if mode == "close-other":
    os.close(os.open(path, os.O_RDONLY))
print(net.slot, flush=True)
sys.stdin.read()
"""

# The same, with lguest's classic F_SETLK lock (fcntl.lockf): the control experiment.
CLASSIC_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
os.close(os.open(sys.argv[1], os.O_RDONLY))
print(0, flush=True)
sys.stdin.read()
"""

ALPHA_MAC = bytes.fromhex("020001000000")
PROMISC_MAC = bytes.fromhex("030002000000")


class Holder:
    def __init__(self, proc: subprocess.Popen, slot: int):
        self.proc, self.slot, self.pid = proc, slot, proc.pid


@pytest.fixture
def holders():
    """spawn(path, mac=b"", mode="") -> Holder; every child is killed and reaped at the end."""
    procs = []

    def spawn(path, mac=b"", mode="", code=HOLDER):
        proc = subprocess.Popen([sys.executable, "-c", code, str(path), mac.hex(), mode],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError("holder failed: " + proc.stderr.read())
        return Holder(proc, int(line))

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def sigkill(holder: Holder) -> None:
    holder.proc.kill()
    holder.proc.wait()


@pytest.fixture
def net(tmp_path):
    return tmp_path / "lan0"


def mac_of(path, slot: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(6 * slot)
        return f.read(6)


# --- opening ------------------------------------------------------------------------------

def test_created_file_is_one_zeroed_page_mode_0600(net):
    fd = open_netfile(net)
    os.close(fd)
    st = os.stat(net)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert net.read_bytes() == bytes(4096)


def test_existing_file_is_opened_not_recreated(net):
    net.write_bytes(ALPHA_MAC + bytes(4090))
    os.chmod(net, 0o644)
    os.close(open_netfile(net))
    assert net.read_bytes()[:6] == ALPHA_MAC
    assert stat.S_IMODE(os.stat(net).st_mode) == 0o644


def test_short_file_grows_to_a_page_so_nobody_maps_past_its_end(net):
    net.write_bytes(b"")
    os.close(open_netfile(net))
    assert net.read_bytes() == bytes(4096)


def test_open_error_in_a_missing_directory(tmp_path):
    path = tmp_path / "no" / "lan0"
    with pytest.raises(LgnetError) as e:
        open_netfile(path)
    assert str(e.value) == "cannot open net file '%s': No such file or directory" % path


def test_open_error_on_a_directory(tmp_path):
    with pytest.raises(LgnetError) as e:
        open_netfile(tmp_path)
    assert str(e.value) == "cannot open net file '%s': Is a directory" % tmp_path


# --- slots across processes ---------------------------------------------------------------

def test_two_processes_get_different_slots(net, holders):
    assert [holders(net).slot, holders(net).slot] == [0, 1]


def test_sigkill_frees_the_slot_and_its_stale_mac_is_cleared(net, holders):
    alpha = holders(net, ALPHA_MAC)
    beta = holders(net)
    assert (alpha.slot, beta.slot) == (0, 1)
    sigkill(alpha)
    # The dead guest's MAC is still there, but nobody holds the slot: stale.
    assert slot_table(net)[0] == SlotInfo(0, ALPHA_MAC, locked=False)
    assert slot_table(net)[0].stale
    gamma = holders(net)
    assert gamma.slot == 0
    assert mac_of(net, 0) == bytes(6)
    assert slot_table(net)[0] == SlotInfo(0, bytes(6), locked=True, pids=(gamma.pid,))


def test_closing_another_descriptor_keeps_the_slot(net, holders):
    alpha = holders(net, mode="close-other")
    assert [(s.slot, s.locked, s.holder) for s in slot_table(net)] == [(0, True, alpha.pid)]
    with NetFile.reserve(net) as mine:
        assert mine.slot == 1


def test_a_classic_lock_would_vanish_which_is_why_slots_are_ofd_locks(net, holders):
    os.close(open_netfile(net))
    holders(net, code=CLASSIC_HOLDER)
    assert slot_table(net) == []


def test_all_slots_locked_is_lguests_error(net):
    locker = open_netfile(net)
    other = open_netfile(net)
    try:
        # One OFD lock over every slot's byte, through another open of the same file.
        fcntl.fcntl(locker, fcntl.F_OFD_SETLK,
                    struct.pack("@hhlli0l", fcntl.F_WRLCK, os.SEEK_SET, 0, abi.NET_SLOTS, 0))
        with pytest.raises(LgnetError) as e:
            reserve_slot(other, net)
        assert str(e.value) == "No free slots in network file %s" % net
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(LgnetError):
            NetFile.reserve(net)
        assert len(os.listdir("/proc/self/fd")) == fds          # nothing leaked
    finally:
        os.close(locker)
        os.close(other)


def test_each_open_reserves_its_own_slot_even_in_one_process(net):
    with NetFile.reserve(net) as a, NetFile.reserve(net) as b:
        assert (a.slot, b.slot) == (0, 1)
        assert reserve_slot(a.fd, net) == 0        # asking again through the same open


def test_close_releases_the_slot(net):
    first = NetFile.reserve(net)
    first.close()
    first.close()                                   # twice is harmless
    with NetFile.reserve(net) as second:
        assert second.slot == 0


# --- mapping and identity -----------------------------------------------------------------

def test_mappings_see_each_others_writes(net, holders):
    alpha = holders(net, ALPHA_MAC)                 # written through the child's mapping
    with NetFile.attach(net) as a, NetFile.attach(net) as b:
        assert a.slot is None
        assert a.mmap[6 * alpha.slot:6 * alpha.slot + 6] == ALPHA_MAC
        a.mmap[100:102] = b"hi"
        assert b.mmap[100:102] == b"hi"
        b.mmap[200:203] = b"yes"
        assert a.mmap[200:203] == b"yes"
    assert net.read_bytes()[100:102] == b"hi"


def test_map_netfile_is_one_shared_page(net):
    fd = open_netfile(net)
    try:
        page = map_netfile(fd)
        assert len(page) == abi.PAGE_SIZE
        page[0:6] = ALPHA_MAC
        page.close()
        assert os.pread(fd, 6, 0) == ALPHA_MAC
    finally:
        os.close(fd)


def test_identity_is_the_files_not_the_opens(net):
    with NetFile.reserve(net) as launcher, NetFile.attach(net) as broker:
        st = os.stat(net)
        assert launcher.identity == broker.identity == (st.st_dev, st.st_ino)
        assert file_identity(launcher.fd) == launcher.identity


# --- the slot table -----------------------------------------------------------------------

def test_slot_table_reports_holders_macs_and_promisc(net, holders):
    alpha = holders(net, ALPHA_MAC)
    beta = holders(net, PROMISC_MAC)
    quiet = holders(net)
    table = slot_table(net)
    assert table == [SlotInfo(0, ALPHA_MAC, True, (alpha.pid,)),
                     SlotInfo(1, PROMISC_MAC, True, (beta.pid,)),
                     SlotInfo(2, bytes(6), True, (quiet.pid,))]
    assert [s.promisc for s in table] == [False, True, False]
    assert table[1].holder == beta.pid and table[1].mac_text == "03:00:02:00:00:00"
    assert not any(s.stale for s in table)


def test_slot_table_takes_no_lock_and_creates_nothing(net, tmp_path):
    with pytest.raises(LgnetError):
        slot_table(net)
    assert not net.exists()
    os.close(open_netfile(net))
    assert slot_table(net) == []
    with NetFile.reserve(net) as mine:
        assert mine.slot == 0


def test_clear_stale_slots_spares_held_slots(net, holders):
    alpha = holders(net, ALPHA_MAC)
    with open(net, "r+b") as f:                     # a MAC nobody holds, as a dead guest left it
        f.seek(6 * 5)
        f.write(PROMISC_MAC)
    assert clear_stale_slots(net) == [5]
    assert mac_of(net, 5) == bytes(6)
    assert mac_of(net, alpha.slot) == ALPHA_MAC
    assert slot_table(net) == [SlotInfo(0, ALPHA_MAC, True, (alpha.pid,))]
