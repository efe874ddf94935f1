"""Impairments in one process: the decisions (lgnet.fabric.impair) and how the engine applies
them at the DMA level (lgnet.fabric.dma), with a fake clock."""
import math

import pytest

from enginekit import Kit, NetFile, RecordingLock
from lgnet.fabric import impair
from lgnet.fabric.dma import Send
from lgnet.fabric.impair import ImpairError, Impairments, Params, Stream, check_params

NET_A, NET_B = 0x10000, 0x18000
SLOT = 0x10
KA, KB = NET_A + SLOT, NET_B + SLOT
UDMA, SRC, ARR, BUF = 0x100, 0x1000, 0x2000, 0x4000
IRQ = 5
FRAME = bytes(range(60))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def stream_decisions(seed, params, frames, length=60):
    stream = Stream(seed, "lan0", "alpha", "beta")
    return [stream.judge(params, "why", length, 0.0) for _ in range(frames)]


# --- the decisions -------------------------------------------------------------------------

def test_loss_over_4000_frames_is_within_4_sigma_of_the_binomial():
    n, p = 4000, 0.1
    dropped = sum(1 for v in stream_decisions(7, check_params({"loss": p}), n)
                  if v is not None and v.dropped)
    assert abs(dropped - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_the_same_seed_drops_the_same_frames_and_another_seed_does_not():
    params = check_params({"loss": 0.2})

    def indices(seed):
        return [i for i, v in enumerate(stream_decisions(seed, params, 2000)) if v is not None]
    assert indices(1) == indices(1)
    assert indices(1) != indices(2)


def test_each_direction_has_its_own_stream():
    params = check_params({"loss": 0.5})
    one = Stream(3, "lan0", "alpha", "beta")
    other = Stream(3, "lan0", "beta", "alpha")
    a = [one.judge(params, "", 60, 0) is None for _ in range(200)]
    b = [other.judge(params, "", 60, 0) is None for _ in range(200)]
    assert a != b


def test_gilbert_elliott_bursts_have_the_mean_length_and_the_long_run_loss():
    lost = [v is not None for v in stream_decisions(5, check_params({"loss": 0.1, "burst": 5}),
                                                    40000)]
    bursts, run = [], 0
    for x in lost + [False]:
        if x:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    assert 0.07 < sum(lost) / len(lost) < 0.13
    assert 4 < sum(bursts) / len(bursts) < 6


def test_delay_and_jitter_stay_in_their_window_and_keep_order_unless_reorder():
    clock = 0.0
    stream = Stream(9, "lan0", "a", "b")
    params = check_params({"delay": 20, "jitter": 5})
    dues = []
    for i in range(500):
        clock += 0.001
        dues.append(stream.judge(params, "", 60, clock).due)
    assert dues == sorted(dues)
    assert all(0.015 - 1e-9 <= due - (i + 1) * 0.001 <= 0.025 + 0.005 for i, due in enumerate(dues))
    stream = Stream(9, "lan0", "a", "b")
    params = check_params({"delay": 20, "jitter": 5, "reorder": True})
    dues = [stream.judge(params, "", 60, i * 0.001).due for i in range(500)]
    assert dues != sorted(dues)
    assert all(0.015 - 1e-9 <= due - i * 0.001 <= 0.025 + 1e-9 for i, due in enumerate(dues))


def test_rate_spaces_frames_by_their_bits_and_drops_beyond_the_limit():
    stream = Stream(1, "lan0", "a", "b")
    params = check_params({"rate": "1mbit", "limit": 10})
    verdicts = [stream.judge(params, "", 125, 0.0) for _ in range(15)]   # 1000 bits each
    assert [v.due for v in verdicts[:10]] == pytest.approx([0.001 * (i + 1) for i in range(10)])
    assert all(v.dropped for v in verdicts[10:])
    # once the queue has drained, frames pass again
    assert stream.judge(params, "", 125, 1.0).due == pytest.approx(1.001)
    fps = check_params({"rate": "100fps"})
    stream = Stream(1, "lan0", "a", "b")
    assert stream.judge(fps, "", 1514, 0.0).due == pytest.approx(0.01)


def test_duplicate_and_corrupt_are_drawn_per_frame():
    verdicts = stream_decisions(4, check_params({"duplicate": 0.5, "corrupt": 0.5}), 1000)
    dups = sum(1 for v in verdicts if v is not None and v.duplicate)
    bad = [v.corrupt for v in verdicts if v is not None and v.corrupt]
    assert 400 < dups < 600 and 400 < len(bad) < 600
    assert all(len(c) == 1 and 0 <= c[0] < 60 * 8 for c in bad)
    assert impair.flip_bits(b"\x00\x00", (9,)) == b"\x00\x02"


@pytest.mark.parametrize("given, key, words", [
    ({"loss": 1.5}, "loss", "probability from 0 to 1"),
    ({"loss": "lots"}, "loss", "probability"),
    ({"delay": -1}, "delay", "milliseconds"),
    ({"rate": "fast"}, "rate", "'10mbit'"),
    ({"rate": 0}, "rate", "above 0"),
    ({"limit": 5}, "limit", "only allowed with 'rate'"),
    ({"burst": 3}, "burst", "only allowed with a 'loss'"),
    ({"reorder": True}, "reorder", "only allowed with 'jitter'"),
    ({"down": "yes"}, "down", "true or false"),
    ({"lossy": 1}, "lossy", "unknown impairment"),
])
def test_bad_values_name_their_key(given, key, words):
    with pytest.raises(ImpairError) as e:
        check_params(given)
    assert e.value.key == key and words in str(e.value)


def test_the_most_specific_rule_applies_and_down_links_and_partitions_win():
    table = Impairments(0, Clock())
    table.set("lan0", None, None, Params(loss=0.1))
    table.set("lan0", "alpha", None, Params(loss=0.2))
    table.set("lan0", "alpha", "beta", Params(loss=0.3))
    assert table.rule_for("lan0", "alpha", "beta")[0].loss == 0.3
    assert table.rule_for("lan0", "alpha", "gamma")[0].loss == 0.2
    assert table.rule_for("lan0", "gamma", "alpha")[0].loss == 0.1
    assert table.rule_for("lan0", "gamma", "alpha")[1] == "loss 0.1 (net lan0)"
    assert table.rule_for("lan1", "gamma", "alpha") is None
    table.link("lan0", "beta", down=True)
    params, why = table.rule_for("lan0", "alpha", "beta")
    assert params.down and why == "link beta on lan0 is down"
    table.link("lan0", "beta", down=False)
    table.partition([["alpha"], ["beta", "gamma"]])
    assert table.rule_for("lan0", "beta", "alpha")[0].down
    assert not table.rule_for("lan0", "beta", "gamma")[0].down      # same side: the net's rule
    assert table.rule_for("lan0", "port0", "alpha")[0].loss == 0.1  # named by no group
    table.heal()
    assert not table.rule_for("lan0", "beta", "alpha")[0].down
    table.set("lan0", None, None, Params())                        # off: the rule goes
    assert ("lan0", None, None) not in table.rules


# --- applied by the engine, at the DMA level -------------------------------------------------

def impaired_pair(**params):
    kit = Kit(lock=RecordingLock())         # taken twice (a deadlock in the broker) fails
    net = NetFile()
    a = kit.guest(net, NET_A)
    b = kit.guest(net, NET_B)
    clock = Clock()
    names = {a: "alpha", b: "beta"}
    table = Impairments(11, clock, net_of=lambda space: "lan0", name_of=names.get)
    table.set("lan0", "alpha", "beta", Params(**params))
    kit.engine.impair = table
    faults = []
    kit.engine.on_fault = lambda src, dst, key, data, why: faults.append((data, why))
    entries = kit.put_array(b, ARR, [[(BUF + i * 0x800, 1514)] for i in range(4)])
    assert kit.bind(b, KB, ARR, 4, IRQ) == 1
    kit.put(a, SRC, FRAME)
    kit.put_dma(a, UDMA, [(SRC, len(FRAME))])
    return kit, a, b, table, clock, entries, faults


def send(kit, a):
    kit.set_used_len(a, UDMA, 0)
    kit.engine.woken.clear()
    return kit.send(a, KA, UDMA)


def test_a_lost_frame_is_sent_for_the_sender_and_never_reaches_the_receiver():
    kit, a, b, table, clock, entries, faults = impaired_pair(loss=1.0)
    assert send(kit, a) is Send.LOST
    assert kit.used_len(a, UDMA) == len(FRAME)           # the sender believes it went
    assert all(kit.used_len(b, e) == 0 for e in entries) and b.irqs_pending == 0
    assert a.counters.tx_lost == 1 and a.counters.tx_carrier_errors == 0
    assert faults == [(FRAME, "dropped: loss 1 (link alpha->beta on lan0)")]


def test_a_down_link_looks_like_a_dead_peer_to_the_sender():
    kit, a, b, table, clock, entries, faults = impaired_pair()
    table.link("lan0", "beta", down=True)
    assert send(kit, a) is Send.LINK_DOWN
    assert kit.used_len(a, UDMA) == 0                    # lguest_net: a carrier error
    assert a.counters.tx_carrier_errors == 1 and b.counters.rx_dropped == 0
    assert all(kit.used_len(b, e) == 0 for e in entries)
    assert faults[0][1] == "down: link beta on lan0 is down"
    table.link("lan0", "beta", down=False)
    table.set("lan0", "alpha", "beta", Params())
    assert send(kit, a) is Send.DELIVERED and kit.used_len(b, entries[0]) == len(FRAME)


def test_a_delayed_frame_is_copied_at_send_time_and_delivered_when_due():
    kit, a, b, table, clock, entries, faults = impaired_pair(delay=20)
    assert send(kit, a) is Send.HELD
    assert kit.used_len(a, UDMA) == len(FRAME)
    kit.put(a, SRC, bytes(60))                           # the sender reuses its buffer
    assert table.take_due(clock.now + 0.019) == [] and kit.used_len(b, entries[0]) == 0
    kit.engine.deliver_late(table.take_due(clock.now + 0.020))
    assert kit.used_len(b, entries[0]) == len(FRAME)
    assert kit.get(b, BUF, len(FRAME)) == FRAME           # what was sent, not what is there now
    assert b.irqs_pending == 1 << IRQ and b.counters.rx_late == 1


def test_a_late_frame_finding_no_free_buffer_is_dropped():
    kit, a, b, table, clock, entries, faults = impaired_pair(delay=1)
    for _ in range(5):
        send(kit, a)
    kit.engine.deliver_late(table.take_due(clock.now + 1))
    assert all(kit.used_len(b, e) == len(FRAME) for e in entries)
    assert b.counters.rx_dropped == 1
    assert faults[-1][1] == "dropped: no free buffer; delayed: delay 1ms (link alpha->beta on lan0)"


def test_a_duplicate_is_a_second_delivery_and_corruption_flips_one_bit_of_the_copy():
    kit, a, b, table, clock, entries, faults = impaired_pair(duplicate=1.0, corrupt=1.0)
    assert send(kit, a) is Send.DELIVERED
    first, second = (kit.get(b, BUF + i * 0x800, len(FRAME)) for i in (0, 1))
    assert first == second != FRAME
    flipped = [bin(x ^ y).count("1") for x, y in zip(first, FRAME)]
    assert sum(flipped) == 1
    assert kit.get(a, SRC, len(FRAME)) == FRAME            # the sender's own bytes are intact
    assert b.counters.rx_duplicates == 1 and b.counters.rx_corrupted == 2


def test_no_impairment_configured_is_the_plain_path():
    kit, a, b, table, clock, entries, faults = impaired_pair()
    table.set("lan0", "alpha", "beta", Params())
    assert send(kit, a) is Send.DELIVERED and faults == []


def test_a_frame_is_judged_once_even_when_it_waits_for_a_restock():
    kit, a, b, table, clock, entries, faults = impaired_pair(loss=1e-9)   # it passes
    for e in entries:
        kit.set_used_len(b, e, 1)                        # every buffer used: Restock, retry
    send(kit, a)
    assert table.streams[("lan0", "alpha", "beta")].frames == 1
