"""The dma_hash view (lgnet.fabric.dmahash), in one process: what it reports, and that looking
changes nothing — not a guest, not a cursor, not a counter."""
from enginekit import RAM_SIZE, Kit, NetFile
from lgnet import abi
from lgnet.fabric import dmahash, keys

NET_A, NET_B = 0x10000, 0x18000
SLOT = 0x10
ARR, BUF, UDMA, SRC = 0x2000, 0x4000, 0x100, 0x1000
IRQ = 3


def test_a_binding_is_on_its_keys_chain_with_each_buffers_used_len():
    kit = Kit()
    net = NetFile()
    a, b = kit.guest(net, NET_A), kit.guest(net, NET_B)
    kit.put_array(b, ARR, [[(BUF + i * 0x100, 0x100)] for i in range(4)])
    assert kit.bind(b, NET_B + SLOT, ARR, 4, IRQ) == 1
    kit.put(a, SRC, b"x" * 60)
    kit.put_dma(a, UDMA, [(SRC, 60)])
    kit.send(a, NET_A + SLOT, UDMA)
    view = dmahash.snapshot(kit.engine)
    [row] = view["bindings"]
    chain = keys.bucket(keys.Key(True, net.identity, SLOT))
    assert (row["chain"], row["position"], row["guest"]) == (chain, 0, b.id)
    assert row["key"] == {"shared": True, "space": list(net.identity), "offset": SLOT}
    assert (row["dmas"], row["num_dmas"], row["interrupt"]) == (ARR, 4, IRQ)
    assert row["used_len"] == [60, 0, 0, 0] and row["next_dma"] == 1
    assert {g["guest"]: g["irqs_pending"] for g in view["guests"]}[b.id] == 1 << IRQ


def test_an_unbacked_entry_reads_as_none_and_kills_no_one():
    kit = Kit()
    g = kit.guest()
    start = RAM_SIZE - 2 * abi.LGUEST_DMA_SIZE          # the rest lies in the hole above RAM
    kit.put_array(g, start, [[(BUF, 0x100)], [(BUF + 0x100, 0x100)]])
    assert kit.bind(g, 0x40, start, 4, IRQ) == 1
    before = (g.dead, g.counters.as_dict(), kit.engine.generation)
    row = dmahash.snapshot(kit.engine)["bindings"][0]
    assert row["used_len"] == [0, 0, None, None]
    assert row["key"] == {"shared": False, "space": g.id, "offset": 0x40}
    assert (g.dead, g.counters.as_dict(), kit.engine.generation) == before
