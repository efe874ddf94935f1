"""The Host's wake-up rules (lgnet.fabric.wakeups) and the free-buffer check, in one process."""
from enginekit import Kit, NetFile
from lgnet import abi
from lgnet.fabric.dma import has_free_buffer
from lgnet.fabric.wakeups import HeldWakes, flag_bits, wakes_halted

LGUEST_DATA = 0x1000
RX = 0x2000


def booted(kit, net=None):
    g = kit.guest(net)
    g.lguest_data = LGUEST_DATA
    return g


def block(kit, g, mask):
    kit.put(g, LGUEST_DATA + abi.LGUEST_DATA_BLOCKED_INTERRUPTS, mask.to_bytes(4, "little"))


def test_flag_bits_reads_one_byte_per_line():
    assert flag_bits(bytes(32)) == 0
    assert flag_bits(bytes([0, 1, 0, 1] + [0] * 28)) == 0b1010


def test_a_halted_guest_wakes_only_for_an_interrupt_it_has_not_blocked():
    kit = Kit()
    g = booted(kit)
    assert not wakes_halted(g, 0, breaking=False)
    block(kit, g, 1 << 3)
    assert not wakes_halted(g, 1 << 3, breaking=False)        # flagged, but blocked
    g.irqs_pending = 1 << 3
    assert not wakes_halted(g, 0, breaking=False)             # raised, but blocked
    assert wakes_halted(g, 1 << 4, breaking=False)
    block(kit, g, 0)
    assert wakes_halted(g, 0, breaking=False)


def test_a_break_or_a_death_wakes_a_halted_guest_whatever_it_blocked():
    kit = Kit()
    g = booted(kit)
    block(kit, g, abi.U32_MASK)
    assert wakes_halted(g, 0, breaking=True)
    kit.engine.kill_guest(g, "gone")
    assert wakes_halted(g, 0, breaking=False)


def test_before_lguest_init_any_pending_interrupt_wakes():
    kit = Kit()
    g = kit.guest()
    assert not wakes_halted(g, 0, breaking=False)
    assert wakes_halted(g, 1, breaking=False)


def test_has_free_buffer_looks_at_every_bound_array_without_killing():
    kit = Kit()
    net = NetFile()
    g = kit.guest(net)
    assert not has_free_buffer(g)
    [entry] = kit.put_array(g, RX, [[(0x3000, 100)]])
    assert kit.bind(g, 0x10000, RX, 1, 1) == 1
    assert has_free_buffer(g)
    kit.set_used_len(g, entry, 5)
    assert not has_free_buffer(g)
    kit.set_used_len(g, entry, 0)
    assert has_free_buffer(g)
    assert kit.bind(g, 0x10004, 0x1C000, 1, 2) == 1          # an array nobody backs
    kit.set_used_len(g, entry, 5)
    assert not has_free_buffer(g) and g.dead is None


def test_a_held_wake_up_goes_when_half_the_buffers_are_filled():
    kit = Kit()
    g = kit.guest(NetFile())
    kit.put_array(g, RX, [[(0x3000, 100)]] * 8)
    kit.bind(g, 0x10000, RX, 8, 1)
    held = HeldWakes(max_seconds=1.0)
    assert [held.hold("rx", g, 1 << 1, "tx", now=0.0) for _ in range(4)] == \
        [True, True, True, False]
    assert not held


def test_a_held_wake_up_goes_when_its_sender_stops_or_it_is_too_old():
    kit = Kit()
    g = kit.guest(NetFile())
    kit.put_array(g, RX, [[(0x3000, 100)]] * 8)
    kit.bind(g, 0x10000, RX, 8, 1)
    held = HeldWakes(max_seconds=1.0)
    assert held.hold("rx", g, 1 << 1, "tx", now=10.0)
    assert held.deadline() == 11.0
    assert held.due(10.5, still_running=lambda sender: True) == []
    assert held.due(10.5, still_running=lambda sender: False) == ["rx"]
    assert held.hold("rx", g, 1 << 1, "tx", now=20.0)
    assert held.due(21.0, still_running=lambda sender: True) == ["rx"]
    assert held.deadline() is None


def test_release_takes_a_held_wake_up_for_the_one_chance_to_restock():
    kit = Kit()
    g = kit.guest(NetFile())
    kit.put_array(g, RX, [[(0x3000, 100)]] * 8)
    kit.bind(g, 0x10000, RX, 8, 1)
    held = HeldWakes()
    assert not held.release("rx")
    held.hold("rx", g, 1 << 1, "tx", now=0.0)
    assert held.release("rx") and not held
