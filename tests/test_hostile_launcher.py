"""A launcher's INITIALIZE cannot bring the broker down (issue 13, item 1).

Each bad request is refused with EINVAL before anything is mapped, the connection stays NEW
(a good INITIALIZE on it still works), and a pair of guests on the same broker goes on
exchanging frames. The first tests are the crashes found against the broker of commit 4ea4f11:
a request that failed after its first region was mapped (BufferError) and 64-bit lengths and
offsets (OverflowError)."""
import errno
import os
import socket

import pytest

from brokerkit import NET_AT, PFN_LIMIT, RAM_SIZE, RX_BUF, BrokerKit
from lgnet import abi, wire
from lgnet.fabric.broker import (MAX_ENDED_ROWS, MAX_NAMES, MAX_QUEUED_REPLIES,
                                 TIMERS_PER_CONNECTION)
from lgnet.fabric.connection import State

PAYLOAD = bytes(range(60))
BIG = 1 << 63


@pytest.fixture
def kit():
    kit = BrokerKit()
    yield kit
    kit.close()


def ram(base=0, length=RAM_SIZE, offset=0, fd=0):
    return wire.Region(base, length, offset, fd, False)


def net(base=NET_AT, fd=1):
    return wire.Region(base, abi.PAGE_SIZE, 0, fd, True)


def initialize(launcher, regions, fds, control_fd=0, control_offset=RAM_SIZE,
               pfn_limit=PFN_LIMIT):
    return launcher.call(wire.OP_INITIALIZE, pfn_limit, 0, 0, 0,
                         wire.encode_layout(regions, control_fd, control_offset), fds=fds)


def assert_refused_and_harmless(kit, launcher, reply):
    """EINVAL, the connection as it was, and the broker still carries a pair's frame."""
    assert reply.result == -errno.EINVAL
    assert launcher.conn.state is State.NEW and launcher.conn.mappings == []
    assert initialize(launcher, [ram(), net()], (launcher.fd, kit.net_fd)).result \
        == abi.INITIALIZE_RESULT
    a, b = kit.launcher().boot(), kit.launcher().boot()
    b.bind_rx(slot=1)
    a.put_tx(PAYLOAD)
    a.send_dma(slot=1)
    assert a.reply().result == 0
    assert b.get(RX_BUF, len(PAYLOAD)) == PAYLOAD


def test_a_failure_after_the_first_region_was_mapped_does_not_crash_the_broker(kit):
    fresh = kit.launcher()
    overlapping = [ram(), wire.Region(RAM_SIZE - abi.PAGE_SIZE, abi.PAGE_SIZE, 0, 1, True)]
    assert_refused_and_harmless(kit, fresh, initialize(fresh, overlapping,
                                                       (fresh.fd, kit.net_fd)))


def test_a_bad_descriptor_index_in_a_later_region_is_refused(kit):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram(), net(fd=7)],
                                                       (fresh.fd, kit.net_fd)))


def test_a_control_page_index_out_of_range_is_refused(kit):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram(), net()],
                                                       (fresh.fd, kit.net_fd), control_fd=9))


@pytest.mark.parametrize("region", [ram(length=BIG), ram(offset=BIG), ram(base=BIG),
                                    ram(length=(1 << 64) - abi.PAGE_SIZE)],
                         ids=["length", "offset", "base", "wrapping length"])
def test_64_bit_region_values_are_refused(kit, region):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [region], (fresh.fd,)))


def test_a_64_bit_control_offset_is_refused(kit):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram()], (fresh.fd,),
                                                       control_offset=BIG))


@pytest.mark.parametrize("pfn_limit", [0, 1 << 21, abi.U32_MASK])
def test_a_pfn_limit_beyond_32_bit_guest_memory_is_refused(kit, pfn_limit):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram(length=abi.PAGE_SIZE)],
                                                       (fresh.fd,), pfn_limit=pfn_limit))


def test_a_region_above_pfn_limit_is_refused(kit):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram(), net()],
                                                       (fresh.fd, kit.net_fd),
                                                       pfn_limit=PFN_LIMIT - 1))


def test_unaligned_and_empty_regions_are_refused(kit):
    fresh = kit.launcher()
    for region in (ram(base=12), ram(offset=12), ram(length=0)):
        assert initialize(fresh, [region], (fresh.fd,)).result == -errno.EINVAL
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram(length=0)], (fresh.fd,)))


def test_too_many_regions_and_a_short_layout_are_refused(kit):
    fresh = kit.launcher()
    header = wire.LAYOUT_HEADER.pack(abi.U32_MASK, 0, RAM_SIZE)
    assert fresh.call(wire.OP_INITIALIZE, PFN_LIMIT, 0, 0, 0, header,
                      fds=(fresh.fd,)).result == -errno.EINVAL
    assert fresh.call(wire.OP_INITIALIZE, PFN_LIMIT, 0, 0, 0, header[:5],
                      fds=(fresh.fd,)).result == -errno.EINVAL
    many = [ram(base=n * abi.PAGE_SIZE, length=abi.PAGE_SIZE) for n in range(wire.MAX_REGIONS + 1)]
    assert_refused_and_harmless(kit, fresh, initialize(fresh, many, (fresh.fd,)))


def _pipe():
    r, w = os.pipe()
    os.close(w)
    return r


def _socket():
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _dev_null():
    return os.open("/dev/null", os.O_RDWR)


def _small_memfd():
    fd = os.memfd_create("small", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, abi.PAGE_SIZE)
    return fd


def _unsealed_memfd():
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, RAM_SIZE + wire.CONTROL_PAGE_SIZE)
    return fd


def _read_only(kit_fd):
    return os.open("/proc/self/fd/%d" % kit_fd, os.O_RDONLY)


@pytest.mark.parametrize("make", [_pipe, _socket, _dev_null, _small_memfd, _unsealed_memfd],
                         ids=["pipe", "socket", "/dev/null", "too small", "not sealed"])
def test_a_descriptor_that_is_not_sealed_memory_of_the_claimed_size_is_refused(kit, make):
    fresh = kit.launcher()
    fd = make()
    try:
        reply = initialize(fresh, [ram(), net()], (fd, kit.net_fd))
    finally:
        os.close(fd)
    assert_refused_and_harmless(kit, fresh, reply)


def test_a_read_only_descriptor_is_refused(kit):
    fresh = kit.launcher()
    fd = _read_only(fresh.fd)
    try:
        reply = initialize(fresh, [ram(), net()], (fd, kit.net_fd))
    finally:
        os.close(fd)
    assert_refused_and_harmless(kit, fresh, reply)


def test_a_shared_region_past_the_end_of_its_net_file_is_refused(kit):
    fresh = kit.launcher()
    beyond = wire.Region(NET_AT, abi.PAGE_SIZE, abi.PAGE_SIZE, 1, True)
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram(), beyond],
                                                       (fresh.fd, kit.net_fd)))


def test_no_descriptor_at_all_is_refused(kit):
    fresh = kit.launcher()
    assert_refused_and_harmless(kit, fresh, initialize(fresh, [ram()], ()))


# --- no blocking I/O: a launcher that never reads its replies -------------------------------

def test_a_launcher_that_never_reads_its_replies_is_closed_and_no_one_else_waits(kit):
    flooder = kit.launcher()
    flooder.sock.setblocking(False)
    request = wire.encode_request(wire.OP_IRQ, 1)      # NEW: each one is answered EINVAL
    sent = 0
    for _ in range(5000):
        try:
            flooder.sock.send(request)
            sent += 1
        except BlockingIOError:
            pass
        except OSError:
            break                                      # the broker closed it
        kit.broker.step(0)
        if flooder.conn.state is State.CLOSED:
            break
    assert flooder.conn.state is State.CLOSED
    assert sent > MAX_QUEUED_REPLIES
    assert flooder.conn not in kit.broker.connections and not flooder.conn.outbox
    a, b = kit.launcher().boot(), kit.launcher().boot()
    b.bind_rx(slot=1)
    a.put_tx(PAYLOAD)
    a.send_dma(slot=1)
    assert a.reply().result == 0 and b.get(RX_BUF, len(PAYLOAD)) == PAYLOAD


def test_a_reply_the_socket_cannot_take_now_waits_and_is_sent_in_order(kit):
    slow = kit.launcher()
    slow.sock.setblocking(False)
    count = 300                    # more than the socket holds, fewer than it and the outbox
    for irq in range(count):
        while True:
            try:
                slow.sock.send(wire.encode_request(wire.OP_IRQ, irq))
                break
            except BlockingIOError:
                kit.broker.step(0)
        kit.broker.step(0)
    kit.settle(count)
    assert slow.conn.outbox and slow.conn.state is State.NEW    # queued, not dropped
    got = 0
    for _ in range(1000):
        try:
            reply = wire.decode_reply(slow.sock.recv(wire.MAX_MESSAGE))
        except BlockingIOError:
            kit.broker.step(0.001)
            continue
        assert reply.result == -errno.EINVAL
        got += 1
        if got == count:
            break
    assert got == count and not slow.conn.outbox


# --- bounded state: every per-connection resource is bounded and freed with it -------------

def test_twenty_thousand_large_names_are_refused_and_hold_nothing(kit):
    lab = kit.launcher()
    big = b"n" * 60000
    for pid in range(20000):
        lab.send(wire.OP_NAME, pid, tail=big)
        kit.broker.step(0)
        assert wire.decode_reply(lab.sock.recv(wire.MAX_MESSAGE)).result == -errno.ENAMETOOLONG
    assert kit.broker.names == {}


def test_names_are_bounded_and_freed_with_their_guest(kit):
    lab = kit.launcher()
    for pid in range(MAX_NAMES):
        assert lab.call(wire.OP_NAME, 100000 + pid, tail=b"guest%d" % pid).result == 0
    assert lab.call(wire.OP_NAME, 1, tail=b"one-too-many").result == -errno.ENOSPC
    assert lab.call(wire.OP_NAME, 100000, tail=b"renamed").result == 0   # a known pid
    kit.broker.names.clear()
    a = kit.launcher().boot()
    assert lab.call(wire.OP_NAME, a.pid, tail=b"alpha").result == 0
    assert kit.broker.names == {a.pid: "alpha"}
    a.sock.close()
    kit.settle()
    assert kit.broker.names == {}


def test_the_rows_of_ended_guests_are_bounded(kit):
    for _ in range(MAX_ENDED_ROWS + 10):
        guest = kit.launcher().boot()
        guest.sock.close()
        kit.settle(2)
        kit.launchers.remove(guest)
        guest.close()
    assert len(kit.broker.ended) == MAX_ENDED_ROWS


def test_a_guest_that_keeps_rearming_its_clock_does_not_grow_the_timer_heap(kit):
    a = kit.launcher().boot()
    for _ in range(2000):
        assert a.hcall(abi.LHCALL_SET_CLOCKEVENT, abi.U32_MASK).result == 0   # ~4 s away
    assert len(kit.broker.timers) <= TIMERS_PER_CONNECTION * (len(kit.broker.connections) + 1)


def test_a_second_initialize_is_ebusy_and_leaves_the_guest_its_memory(kit):
    # Found by the fuzzer: the refusal released the running guest's mappings, and its next
    # hypercall met a released memoryview (the broker died of a ValueError).
    a = kit.launcher().boot()
    assert a.initialize().result == -errno.EBUSY
    assert a.hcall(abi.LHCALL_SET_CLOCKEVENT, 0).result == 0
    assert a.conn.state is State.RUNNING and a.conn.mappings
