"""A real Broker in this process, its launchers socketpairs (tests/brokerkit.py).

What only the broker decides is tested here: whom a delivery wakes and when, the one chance to
restock as a visible step, the requests of a connection in each of its states — and that no
socket is touched while lguest_lock is held (DESIGN rule 8)."""
import errno
import socket

import pytest

from brokerkit import RX_BUF, TX, BrokerKit
from lgnet import abi, wire
from lgnet.fabric.connection import Input, State

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
    kit.broker.restock_seconds = 60               # however slow this machine is today
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
    kit.broker.held.max_seconds = 60              # only the restock lets it go
    a, b = pair(kit)
    entries = b.bind_rx(1, count=8)
    for entry in entries[1:]:
        b.put_u32(entry, 77)                      # seven of eight buffers still full
    b.halt()
    kit.settle()
    a.put_tx(PAYLOAD)
    # Two sends queued in a's ring: the first fills the last free buffer, the second finds
    # none (both raise b's interrupt: two frames of a wake-up held while a runs its ring,
    # fewer than half of b's eight buffers), so b must be woken to restock.
    send = (abi.LHCALL_SEND_DMA, a.key(1), TX, 0)
    a.queue(send, send)
    a.send(wire.OP_NOTIFY)
    for _ in range(20):
        kit.broker.step(0)
        if b.answered():
            break
    assert b.reply().result == 0
    assert kit.broker.counters.restocks == 1 and kit.broker.counters.wakes_deferred == 2
    assert b.u32(entries[0]) == len(PAYLOAD)


def test_a_drained_rings_frames_count_toward_a_held_wake_up_one_by_one(kit):
    """A ring pass tells a receiver once, however many of its frames it delivered, and the
    held wake-up still counts frames: half of eight buffers filled lets it go."""
    kit.broker.held.max_seconds = 60
    a, b = pair(kit)
    entries = b.bind_rx(1, count=8)
    b.halt()
    kit.settle()
    a.put_tx(PAYLOAD)
    send = (abi.LHCALL_SEND_DMA, a.key(1), TX, 0)
    a.queue(send, send, send)                      # three frames: fewer than half
    a.control[wire.CONTROL_KICK] = 1
    a.send(wire.OP_NOTIFY)
    kit.settle()
    assert not b.answered() and kit.broker.counters.wakes_deferred == 3
    a.queue(send, start=3)                         # the fourth: half filled, b wakes
    a.control[wire.CONTROL_KICK] = 1
    a.send(wire.OP_NOTIFY)
    kit.settle()
    assert b.reply().result == 0 and kit.broker.counters.wakes == 1
    assert [b.u32(e) for e in entries[:4]] == [len(PAYLOAD)] * 4


def test_the_rings_send_after_a_restock_frees_its_ring_entry(kit):
    kit.broker.restock_seconds = 60
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


def test_a_guest_may_ring_again_after_a_synchronous_call_parked_on_a_restock(kit):
    """The doorbell: CONTROL_KICK stays 1 only while the guest's ring is on the run list. A
    ring taken off it by a synchronous call that parked on a restock must let its guest ring
    again, or every later queued call waits for the guest's next synchronous one."""
    kit.broker.restock_seconds = 60
    a, b = pair(kit)
    entries = b.bind_rx(1, count=16)
    a.put_tx(PAYLOAD)
    send = (abi.LHCALL_SEND_DMA, a.key(1), TX, 0)
    a.queue(*[send] * 17)                          # one more than a pass, and than b's buffers
    a.control[wire.CONTROL_KICK] = 1               # as the launcher rings: "the broker is on it"
    a.send(wire.OP_NOTIFY)
    kit.broker.step(0)                             # a pass of 16: b is full, the 17th waits
    a.send(wire.OP_HCALL, abi.LHCALL_FLUSH_ASYNC)  # the synchronous call drains the rest...
    kit.settle()
    assert not a.answered() and kit.broker.counters.restocks == 1   # ... and parks on it
    b.put_u32(entries[0], 0)                       # b re-arms one buffer
    a.reply()                                      # the final try ran: the call returns
    assert b.u32(entries[0]) == len(PAYLOAD)
    assert a.control[wire.CONTROL_KICK] == 0       # a rings again for its next queued call


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


# --- the connection's state machine (lgnet.fabric.connection), one state at a time ---------

def test_every_state_has_an_action_for_every_input(kit):
    for state in State:
        for event in Input:
            action, after = kit.broker.actions[state, event]
            assert callable(action) and (after is None or isinstance(after, State))


def state_of(launcher):
    return launcher.conn.state


def test_new_accepts_only_initialize_and_attach(kit):
    fresh = kit.launcher()
    assert state_of(fresh) is State.NEW
    assert fresh.hcall(abi.LHCALL_HALT).result == -errno.EINVAL
    assert fresh.call(wire.OP_GETDMA, 0).result == -errno.EINVAL
    assert fresh.call(wire.OP_BREAK, 1).result == -errno.EINVAL
    assert fresh.call(wire.OP_ATTACH, 7).result == -errno.ENOENT
    assert fresh.call(99).result == -errno.EINVAL                    # no such request
    assert state_of(fresh) is State.NEW
    assert fresh.initialize().result == abi.INITIALIZE_RESULT
    assert state_of(fresh) is State.RUNNING
    assert fresh.initialize().result == -errno.EBUSY


def test_a_malformed_initialize_is_refused_and_the_connection_stays_new(kit):
    fresh = kit.launcher()
    reply = fresh.call(wire.OP_INITIALIZE, 1, 0, 0, 0, b"\x01\x02", fds=(fresh.fd,))
    assert reply.result == -errno.EINVAL and state_of(fresh) is State.NEW


def test_a_sharer_may_only_break(kit):
    owner = kit.launcher().boot()
    sharer = kit.launcher()
    assert sharer.call(wire.OP_ATTACH, owner.guest_id).result == 0
    assert state_of(sharer) is State.SHARING
    for op, arg in ((wire.OP_GETDMA, 0), (wire.OP_IRQ, 1), (wire.OP_INITIALIZE, 0),
                    (wire.OP_KILL, 0)):
        assert sharer.call(op, arg).result == -errno.EPERM
    assert sharer.hcall(abi.LHCALL_HALT).result == -errno.EPERM
    assert sharer.call(wire.OP_ATTACH, owner.guest_id).result == -errno.EBUSY


def test_break_kicks_a_halted_owner_out_and_waits_for_break_0(kit):
    owner = kit.launcher().boot()
    sharer = kit.launcher()
    sharer.call(wire.OP_ATTACH, owner.guest_id)
    owner.halt()
    kit.settle()
    assert state_of(owner) is State.HALTED
    sharer.send(wire.OP_BREAK, 1)
    reply = owner.reply()
    assert reply.flags & wire.FLAG_AGAIN and state_of(owner) is State.RUNNING
    assert state_of(sharer) is State.BREAKING and not sharer.answered()
    assert owner.call(wire.OP_BREAK, 0).result == 0
    assert sharer.reply().result == 0 and state_of(sharer) is State.SHARING


def test_a_request_while_a_break_waits_closes_that_connection(kit):
    owner = kit.launcher().boot()
    sharer = kit.launcher()
    sharer.call(wire.OP_ATTACH, owner.guest_id)
    sharer.send(wire.OP_BREAK, 1)
    kit.settle()
    sharer.send(wire.OP_BREAK, 1)
    kit.settle()
    assert state_of(sharer) is State.CLOSED and not kit.broker.breakers.get(owner.guest_id)


def test_a_second_call_while_a_halt_waits_closes_the_connection(kit):
    owner = kit.launcher().boot()
    gid = owner.guest_id
    owner.halt()
    kit.settle()
    owner.halt()
    kit.settle()
    assert state_of(owner) is State.CLOSED
    assert kit.broker.engine.guests[gid] is None                 # lguest's close()


def test_a_ring_stopped_at_a_dma_for_the_launcher_tells_the_next_call_first(kit):
    a = kit.launcher().boot()
    private_key = 0x5000                                         # in RAM: a private key
    a.queue((abi.LHCALL_SEND_DMA, private_key, TX, 0), (abi.LHCALL_SET_CLOCKEVENT, 0, 0, 0))
    a.send(wire.OP_NOTIFY)
    kit.settle()
    assert state_of(a) is State.PENDING_DMA
    reply = a.hcall(abi.LHCALL_HALT)
    assert reply.flags == wire.FLAG_PENDING_DMA | wire.FLAG_DEFERRED
    assert (reply.arg0, reply.arg1) == (TX, private_key)
    assert state_of(a) is State.RUNNING
    a.control[wire.CONTROL_IRQ_FLAGS + 1] = 1                      # so the HALT returns
    reply = a.hcall(abi.LHCALL_HALT)                              # the rest of the ring, then HALT
    assert reply.flags == 0 and reply.result == 0
    status = abi.LGUEST_DATA_HCALL_STATUS + 0x1000
    assert a.get(status, 2) == bytes([abi.HCALL_STATUS_EMPTY]) * 2


def test_a_sync_send_to_a_private_key_is_handed_to_the_launcher(kit):
    a = kit.launcher().boot()
    reply = a.hcall(abi.LHCALL_SEND_DMA, 0x5000, TX)
    assert reply.flags == wire.FLAG_PENDING_DMA and (reply.arg0, reply.arg1) == (TX, 0x5000)


def test_a_dead_guest_hears_why_on_every_call_and_keeps_its_first_reason(kit):
    a, b = pair(kit)
    a.put(0x2000, b"down\0")
    a.hcall(abi.LHCALL_CRASH, 0x2000)
    assert state_of(a) is State.DEAD and a.control[wire.CONTROL_DEAD] == 1
    assert a.hcall(abi.LHCALL_HALT).dead == "CRASH: down"
    assert a.call(wire.OP_KILL, tail=b"later").result == 0
    assert a.hcall(abi.LHCALL_HALT).dead == "CRASH: down"
    assert a.call(wire.OP_GETDMA, a.key(0)).result == -errno.ENOENT
    assert state_of(b) is State.RUNNING


def test_a_halted_guest_killed_by_its_launcher_hears_it_at_once(kit):
    a = kit.launcher().boot()
    sharer = kit.launcher()
    sharer.call(wire.OP_ATTACH, a.guest_id)
    a.halt()
    kit.settle()
    kit.broker.engine.kill_guest(a.guest, "bad pointer from the launcher")
    kit.broker._tell_woken()
    assert a.reply().dead == "bad pointer from the launcher"
    assert state_of(a) is State.DEAD


def test_a_hangup_closes_and_frees_the_guest_slot_and_releases_its_breakers(kit):
    owner = kit.launcher().boot()
    sharer = kit.launcher()
    sharer.call(wire.OP_ATTACH, owner.guest_id)
    sharer.send(wire.OP_BREAK, 1)
    kit.settle()
    gid = owner.guest_id
    owner.sock.close()
    assert sharer.reply().result == 0
    assert state_of(owner) is State.CLOSED and kit.broker.engine.guests[gid] is None
    assert kit.broker.stats()[0]["guest"] == gid                  # its counters stay


def test_a_timer_wakes_a_halted_guest(kit):
    a = kit.launcher().boot()
    assert a.hcall(abi.LHCALL_SET_CLOCKEVENT, 1_000_000).result == 0    # 1 ms
    assert a.hcall(abi.LHCALL_HALT).result == 0
    assert a.irq_flag(abi.TIMER_IRQ) == 1


def test_a_clock_event_queued_before_a_parked_send_is_not_lost(kit):
    kit.broker.restock_seconds = 60
    a, b = pair(kit)
    [entry] = b.bind_rx(1)
    b.put_u32(entry, 77)
    a.put_tx(PAYLOAD)
    a.queue((abi.LHCALL_SET_CLOCKEVENT, 1_000_000, 0, 0), (abi.LHCALL_SEND_DMA, a.key(1), TX, 0))
    a.halt()                                      # drains the ring first: parks at the send
    kit.settle()
    assert kit.broker.counters.restocks == 1
    b.put_u32(entry, 0)
    assert a.reply().result == 0                  # the HALT returns: the timer fired
    assert a.irq_flag(abi.TIMER_IRQ) == 1
