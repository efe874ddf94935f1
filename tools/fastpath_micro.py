"""Micro-benchmark of the per-frame path, in one process: a ring of 64 SEND_DMAs of 1514 B
from A to B drained by hypercalls.drain_async, on the Python reference and on the compiled
path; µs per frame (median over runs). The broker's own figures come from `lgnet bench`;
this isolates the engine. Usage: PYTHONPATH=. python tools/fastpath_micro.py [runs]"""
import statistics
import sys
import time

from lgnet import abi
from lgnet.fabric import hypercalls
from lgnet.fabric.dma import Engine
from lgnet.fabric.memory import GuestMemory

RAM = 1 << 20
NET_AT = RAM                          # each guest maps the net page right above its RAM
DATA = 0x800                          # struct lguest_data (the ring)
ARRAY = 0x2000                        # B's 64 receive buffers' descriptors
TX = 0x4000                           # A's send descriptor
BUFS = 0x10000                        # one page per receive buffer, A's frame after them
FRAMES = abi.LHCALL_RING_SIZE
SIZE = abi.ETH_FRAME_LEN


def world(compiled: bool, capture: bool):
    engine = Engine(compiled=compiled)
    net = bytearray(abi.PAGE_SIZE)
    guests = []
    for _ in range(2):
        memory = GuestMemory()
        memory.add_region(0, bytearray(RAM), name="ram")
        memory.add_region(NET_AT, net, shared=(7, 42), name="net")
        g = engine.initialize(None, memory, (RAM + abi.PAGE_SIZE) // abi.PAGE_SIZE, 0, 0, 0)
        memory.scatter(DATA + abi.LGUEST_DATA_HCALL_STATUS,
                       bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE)
        hypercalls.hypercall(engine, g, abi.LHCALL_LGUEST_INIT, DATA, 0, 0)
        guests.append(g)
    a, b = guests
    for i in range(FRAMES):
        b.memory.scatter(ARRAY + i * abi.LGUEST_DMA_SIZE,
                         abi.pack_dma([(BUFS + i * abi.PAGE_SIZE, SIZE)]))
    assert engine.bind_dma(b, NET_AT, ARRAY, FRAMES, 5) == 1
    a.memory.scatter(TX, abi.pack_dma([(BUFS + FRAMES * abi.PAGE_SIZE, SIZE)]))
    if capture:
        seen = []
        engine.on_transfer = lambda *args: seen.append(args[4])
    return engine, a, b


def one_ring(engine, a, b) -> float:
    for i in range(FRAMES):                        # B took every frame
        b.memory.write_u32(ARRAY + i * abi.LGUEST_DMA_SIZE, 0)
    b.irqs_pending = 0
    view, status_at, calls_at, _unpack = a.ring
    for slot in range(FRAMES):
        abi.ASYNC_HCALL.pack_into(view, calls_at + slot * abi.ASYNC_HCALL.size,
                                  abi.LHCALL_SEND_DMA, NET_AT, TX, 0)
        view[status_at + slot] = abi.HCALL_STATUS_PENDING
    started = time.perf_counter()
    ran = hypercalls.drain_async(engine, a, hypercalls.Outcome())
    elapsed = time.perf_counter() - started
    assert ran == FRAMES and b.counters.rx_packets % FRAMES == 0, (ran, b.counters.as_dict())
    engine.take_woken()
    return elapsed


def main(runs: int) -> None:
    for capture in (False, True):
        figures = {}
        for compiled in (False, True):
            engine, a, b = world(compiled, capture)
            one_ring(engine, a, b)                 # the first lookup and where: Python's
            times = [one_ring(engine, a, b) for _ in range(runs)]
            figures[compiled] = statistics.median(times) / FRAMES * 1e6
            assert not compiled or engine.fast_frames == runs * FRAMES + FRAMES - 1
        print("%-12s python %.2f us/frame, compiled %.2f us/frame (%.1fx)"
              % ("capture hook" if capture else "plain", figures[False], figures[True],
                 figures[False] / figures[True]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
