"""A real Broker in this process, its launchers socketpairs (tests/brokerkit.py).

What only the broker decides is tested here: whom a delivery wakes and when, the one chance to
restock as a visible step, the requests of a connection in each of its states — and that no
socket is touched while lguest_lock is held (DESIGN rule 8)."""
import socket

import pytest

from brokerkit import RX, RX_BUF, TX, BrokerKit
from lgnet import abi, wire
from lgnet.fabric import broker as broker_module

PAYLOAD = bytes(range(60))


@pytest.fixture
def kit():
    kit = BrokerKit()
    yield kit
    kit.close()


def pair(kit):
    """Two booted guests on the kit's net page: a (slot 0) and b (slot 1)."""
    return kit.launcher().boot(), kit.launcher().boot()


def test_a_halted_receiver_is_woken_by_a_delivery_and_sees_its_flag(kit):
    a, b = pair(kit)
    [entry] = b.bind_rx(1)
    b.halt()
    kit.settle()
    assert not b.answered()                       # nothing pending: it sleeps
    a.put_tx(PAYLOAD)
    assert a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX).result == 0
    assert a.u32(TX) == len(PAYLOAD) and b.u32(entry) == len(PAYLOAD)
    assert b.get(RX_BUF, len(PAYLOAD)) == PAYLOAD
    assert b.reply().result == 0                  # the HALT returns
    assert b.irq_flag(1) == 1


def test_a_halted_guest_sleeps_through_an_interrupt_it_blocked(kit):
    a, b = pair(kit)
    b.bind_rx(1, irq=2)
    b.block(1 << 2)
    b.halt()
    a.put_tx(PAYLOAD)
    a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX)
    kit.settle()
    assert not b.answered() and b.irq_flag(2) == 1    # raised, flagged, not woken
    b.block(0)
    a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX)        # no free buffer now: still raises it
    assert b.reply().result == 0


def test_a_halt_with_an_interrupt_already_flagged_returns_at_once(kit):
    a, b = pair(kit)
    b.bind_rx(1)
    a.put_tx(PAYLOAD)
    a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX)
    assert b.irq_flag(1) == 1
    assert b.hcall(abi.LHCALL_HALT).result == 0


def test_restock_is_a_step_the_sender_waits_in_while_the_receiver_runs(kit):
    a, b = pair(kit)
    [entry] = b.bind_rx(1)
    b.put_u32(entry, 77)                          # not yet consumed: no free buffer
    a.put_tx(PAYLOAD)
    a.send_dma(1)
    kit.settle()
    assert not a.answered()                       # parked: the receiver's chance to restock
    assert kit.broker.counters.restocks == 1
    assert b.u32(entry) == 77 and b.irq_flag(1) == 1
    b.put_u32(entry, 0)                           # the receiver re-arms its buffer
    assert a.reply().result == 0                  # the final try delivered it
    assert a.u32(TX) == len(PAYLOAD) and b.u32(entry) == len(PAYLOAD)


def test_a_second_failure_after_the_restock_is_final(kit):
    a, b = pair(kit)
    [entry] = b.bind_rx(1)
    b.put_u32(entry, 77)
    a.put_tx(PAYLOAD)
    assert a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX).result == 0
    assert a.u32(TX) == 0 and b.u32(entry) == 77
    assert a.guest.counters.tx_carrier_errors == 1 and b.guest.counters.rx_dropped == 1


def test_restock_wakes_a_receiver_whose_wake_up_is_held(kit):
    a, b = pair(kit)
    [first, second] = b.bind_rx(1, count=2)
    b.halt()
    kit.settle()
    a.put_tx(PAYLOAD)
    # Three sends queued in a's ring: the first fills a buffer (the wake-up is held while a
    # runs its ring), the second the other, the third finds none: b must run to restock.
    send = (abi.LHCALL_SEND_DMA, a.key(1), TX, 0)
    a.queue(send, send, send)
    a.send(wire.OP_NOTIFY)
    for _ in range(20):
        kit.broker.step(0)
        if b.answered():
            break
    assert b.reply().result == 0
    assert b.u32(first) == b.u32(second) == len(PAYLOAD)


def test_the_rings_send_after_a_restock_frees_its_ring_entry(kit):
    a, b = pair(kit)
    [entry] = b.bind_rx(1)
    b.put_u32(entry, 77)
    a.put_tx(PAYLOAD)
    a.queue((abi.LHCALL_SEND_DMA, a.key(1), TX, 0))
    a.send(wire.OP_NOTIFY)
    kit.settle()
    status = abi.LGUEST_DATA_HCALL_STATUS + 0x1000
    assert a.get(status, 1)[0] == abi.HCALL_STATUS_PENDING   # waits for the final try
    b.put_u32(entry, 0)
    kit.settle()
    assert a.get(status, 1)[0] == abi.HCALL_STATUS_EMPTY
    assert b.u32(entry) == len(PAYLOAD)


def test_no_socket_is_touched_while_lguest_lock_is_held(kit, monkeypatch):
    seen = {"calls": 0}

    def guarded(name):
        original = getattr(socket.socket, name)

        def method(self, *args, **kwargs):
            assert not kit.lock.held, "socket.%s under lguest_lock" % name
            seen["calls"] += 1
            return original(self, *args, **kwargs)
        return method

    for name in ("send", "sendmsg", "recv", "recvmsg", "sendall"):
        monkeypatch.setattr(socket.socket, name, guarded(name))
    a, b = pair(kit)
    c = kit.launcher().boot()
    [entry] = b.bind_rx(1)
    b.halt()
    a.put_tx(PAYLOAD)
    a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX)          # delivery wakes halted b
    assert b.reply().result == 0
    b.put_u32(entry, 77)
    b.halt()
    a.hcall(abi.LHCALL_SEND_DMA, a.key(1), TX)          # restock, then final failure
    b.reply()
    a.queue((abi.LHCALL_SEND_DMA, a.key(1), TX, 0))
    a.send(wire.OP_NOTIFY)
    kit.settle()
    assert c.call(wire.OP_IRQ, 3).result == 0           # IRQ request: c raises its own line
    c.halt()
    assert c.reply().result == 0
    a.hcall(abi.LHCALL_CRASH, 0x2000)                  # a kills itself: dead reply
    assert a.hcall(abi.LHCALL_HALT).dead is not None
    assert kit.lock.acquired > 5 and seen["calls"] > 10
