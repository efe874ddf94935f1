"""A HALT answered in the launcher (guest/host.py's BrokerHost), against a real Broker in this
process (tests/brokerkit.py): only when lguest's Host would not have slept either, and never
leaving the broker believing a running guest is halted (fabric/connection.py's states)."""
import pytest

from brokerkit import LGUEST_DATA, RAM_SIZE, TX, BrokerKit
from lgnet import abi, wire
from lgnet.fabric.connection import State
from lgnet.guest.host import BrokerHost
from lgnet.guest.physmem import PhysMap

PAYLOAD = bytes(range(60))
PRIVATE_KEY = 0x5000                  # an address in the kit guest's RAM: a private key


class KitChannel:
    """wire.Channel's two calls over a kit launcher's socket, turning the broker's loop."""

    def __init__(self, launcher):
        self.launcher = launcher
        self.sent = []

    def send(self, op, a=0, b=0, c=0, d=0, tail=b"", fds=None):
        self.sent.append((op, a))
        self.launcher.send(op, a, b, c, d, tail)

    def call(self, op, a=0, b=0, c=0, d=0, tail=b"", fds=None):
        self.send(op, a, b, c, d, tail)
        return self.launcher.reply()


class Guest:
    """A kit launcher seen through a BrokerHost, as the guest's CPU sees the Host."""

    def __init__(self, kit):
        self.kit_launcher = kit.launcher()
        assert self.kit_launcher.initialize().result == abi.INITIALIZE_RESULT
        self.phys = PhysMap()
        self.phys.add(0, memoryview(self.kit_launcher.ram)[:RAM_SIZE])
        self.channel = KitChannel(self.kit_launcher)
        self.dmas = []
        self.host = BrokerHost(self.channel, self.kit_launcher.control,
                               lambda dma, key: self.dmas.append((dma, key)), lambda: None,
                               self.phys)
        self.kit_launcher.put(LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS,
                              bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE)
        assert self.host.hypercall(abi.LHCALL_LGUEST_INIT, LGUEST_DATA) == 0

    @property
    def state(self):
        return self.kit_launcher.conn.state

    def messages(self):
        return len(self.channel.sent)

    def close(self):
        self.phys.release()


@pytest.fixture
def kit():
    kit = BrokerKit()
    guests = []
    kit.guest = lambda: guests.append(Guest(kit)) or guests[-1]
    yield kit
    for guest in guests:
        guest.close()
    kit.close()


def flagged_receiver(kit, irq=1):
    """A sender (a kit launcher, slot 0) and a receiver (slot 1) with a frame delivered and
    its interrupt flagged, the receiver running."""
    sender = kit.launcher().boot()
    receiver = kit.guest()
    receiver.kit_launcher.bind_rx(1, count=4, irq=irq)
    sender.put_tx(PAYLOAD)
    assert sender.hcall(abi.LHCALL_SEND_DMA, sender.key(1), TX).result == 0
    assert receiver.host.pending_irqs() == 1 << irq
    return sender, receiver


def test_a_halt_with_an_unblocked_interrupt_flagged_returns_with_no_message(kit):
    _sender, receiver = flagged_receiver(kit)
    before = receiver.messages()
    assert receiver.host.hypercall(abi.LHCALL_HALT) == 0
    assert receiver.messages() == before
    kit.settle()
    assert receiver.state is State.RUNNING            # the broker's view: it never halted


def test_once_the_interrupt_is_taken_the_halt_sleeps_in_the_broker_and_a_delivery_wakes_it(kit):
    sender, receiver = flagged_receiver(kit)
    receiver.host.ack_irq(1)
    assert not receiver.host.halt_returns_at_once()
    receiver.kit_launcher.halt()
    kit.settle()
    assert receiver.state is State.HALTED
    assert sender.hcall(abi.LHCALL_SEND_DMA, sender.key(1), TX).result == 0
    assert receiver.kit_launcher.reply().result == 0
    assert receiver.state is State.RUNNING


def test_a_halt_with_queued_calls_goes_to_the_host_which_runs_the_ring_first(kit):
    # lguest drained the async ring before every synchronous call, HALT included.
    sender, receiver = flagged_receiver(kit)
    sender.bind_rx(0)
    receiver.kit_launcher.put_tx(PAYLOAD)
    receiver.kit_launcher.queue((abi.LHCALL_SEND_DMA, receiver.kit_launcher.key(0), TX, 0))
    assert not receiver.host.halt_returns_at_once()
    assert receiver.host.hypercall(abi.LHCALL_HALT) == 0        # interrupt pending: at once
    assert receiver.channel.sent[-1] == (wire.OP_HCALL, abi.LHCALL_HALT)
    assert sender.irq_flag(1) == 1                              # the queued send ran
    status = LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS
    assert receiver.kit_launcher.get(status, 1) == bytes([abi.HCALL_STATUS_EMPTY])
    assert receiver.state is State.RUNNING


def test_an_interrupt_the_guest_blocked_does_not_end_its_halt(kit):
    _sender, receiver = flagged_receiver(kit, irq=2)
    receiver.kit_launcher.block(1 << 2)
    assert not receiver.host.halt_returns_at_once()
    receiver.kit_launcher.halt()
    kit.settle()
    assert receiver.state is State.HALTED                       # lguest slept on


def test_a_ring_the_broker_is_running_sends_the_halt_to_the_host(kit):
    _sender, receiver = flagged_receiver(kit)
    receiver.kit_launcher.control[wire.CONTROL_KICK] = 1        # rung, not yet run dry
    assert not receiver.host.halt_returns_at_once()


def test_a_dma_for_the_launcher_left_by_a_doorbell_is_served_before_the_guest_runs_on(kit):
    _sender, receiver = flagged_receiver(kit)
    receiver.kit_launcher.queue((abi.LHCALL_SEND_DMA, PRIVATE_KEY, TX, 0))
    receiver.host.notify()
    kit.settle()
    assert receiver.state is State.PENDING_DMA
    assert receiver.kit_launcher.control[wire.CONTROL_PENDING_DMA] == 1
    assert receiver.kit_launcher.control[wire.CONTROL_KICK] == 0   # the ring ran: no kick
    assert not receiver.host.halt_returns_at_once()
    assert receiver.host.hypercall(abi.LHCALL_HALT) == 0
    assert receiver.dmas == [(TX, PRIVATE_KEY)]                 # the Launcher served it
    assert receiver.kit_launcher.control[wire.CONTROL_PENDING_DMA] == 0
    assert receiver.state is State.RUNNING


@pytest.mark.parametrize("flag", [wire.CONTROL_BREAK, wire.CONTROL_DEAD])
def test_a_break_or_a_death_is_heard_from_the_host(kit, flag):
    _sender, receiver = flagged_receiver(kit)
    receiver.kit_launcher.control[flag] = 1
    assert not receiver.host.halt_returns_at_once()


def test_before_lguest_init_every_halt_goes_to_the_host(kit):
    receiver = kit.guest()
    receiver.host.lguest_data = None
    receiver.kit_launcher.control[wire.CONTROL_IRQ_FLAGS + 1] = 1
    assert not receiver.host.halt_returns_at_once()


# --- real processes: no wake-up is lost ---------------------------------------------------

RACE_ROUNDS = 1500


@pytest.mark.timeout(90)
def test_halts_that_race_their_interrupts_never_sleep_through_one(guests, tmp_path):
    """tests/guests/racer.py: no timer, so a lost wake-up hangs the pair (and times out)."""
    net = tmp_path / "lan0.net"
    pong = guests.launch(net, kernel="python:tests.guests.racer", args=["role=pong", "seed=1"])
    ping = guests.launch(net, kernel="python:tests.guests.racer",
                         args=["role=ping", "seed=2", "rounds=%d" % RACE_ROUNDS])
    out = guests.finish(ping, timeout=60)
    assert ping.returncode == 0 and "raced %d" % RACE_ROUNDS in out, out
    guests.finish(pong, timeout=10)
    assert pong.returncode == 0
