"""The Host's half of `--trace`: the broker's track on the timeline (lgnet.timeline).

Rules of this file: it only observes, like the capture. With tracing off none of it exists
(the engine gets the bare lguest_lock and the capture's hook; the broker checks one attribute
per pass of its loop). With it on, three things are recorded on the broker's track:
- every hold of lguest_lock, as a slice (`TracedLock` stands in for the lock the engine takes);
- every transfer, nested in the hold that made it: who sent to whom, the key as the capture
  writes it (`lan0+0x4`), the receive buffer, used_len, the interrupt line, and the capture's
  send number — what lgnet.timeline's merge joins the guests' slices with;
- every "one chance to restock" window, on a track of its own (windows of different senders
  may overlap), from the send that found no buffer to its final try.
Events are buffered (adding one under the lock is a list append); the broker flushes after a
pass of its loop, outside lguest_lock (DESIGN rule 8).
"""
from __future__ import annotations

import threading

from lgnet import abi, netfile, timeline
from lgnet.fabric.capture import Capture

LOCK_TRACK = 1
RESTOCK_TRACK = 2


class TracedLock:
    """lguest_lock, with each hold a slice on the broker's track."""

    def __init__(self, stream: timeline.EventStream):
        self.stream = stream
        self.inner = threading.Lock()
        self.taken_at = 0.0

    def __enter__(self) -> "TracedLock":
        self.inner.acquire()
        self.taken_at = timeline.now_us()
        return self

    def __exit__(self, *exc) -> None:
        taken = self.taken_at
        self.inner.release()
        self.stream.complete(LOCK_TRACK, timeline.CAT_LOCK, "lguest_lock", taken,
                             timeline.now_us() - taken)


class BrokerTrace:
    """The broker's event stream; the capture (always on with a trace) numbers the sends."""

    def __init__(self, path: str, capture: Capture):
        self.stream = timeline.EventStream(path, "broker (the Host)")
        self.stream.thread(LOCK_TRACK, "lguest_lock and transfers")
        self.stream.thread(RESTOCK_TRACK, "one chance to restock")
        self.lock = TracedLock(self.stream)
        self.capture = capture

    def on_transfer(self, src, dst, index: int, entry: int, copied: int,
                    src_dma: abi.LguestDma, fault: str = "") -> None:
        """The engine's hook (under lguest_lock): the capture's record, then ours."""
        send = self.capture.on_transfer(src, dst, index, entry, copied, src_dma, fault)
        receiver = dst.guest
        net = self.capture.nets.get(dst.key.space)
        sender_name = self.capture.guest_name(src)
        receiver_name = self.capture.guest_name(receiver)
        now = timeline.now_us()
        begun = self.lock.taken_at
        self.stream.complete(LOCK_TRACK, timeline.CAT_TRANSFER,
                             "transfer %s -> %s" % (sender_name, receiver_name), begun,
                             now - begun, {
                                 "send": send, "sender": sender_name,
                                 "receiver": receiver_name, "sender_pid": src.owner,
                                 "receiver_pid": receiver.owner, "receiver_guest": receiver.id,
                                 "key": netfile.key_text(net.name if net else "shared",
                                                         dst.key.offset),
                                 "buffer": index, "used_len": copied,
                                 "offered": src_dma.total, "irq": dst.interrupt})

    def restock(self, sender, receiver, started_s: float, ended_s: float, outcome: str) -> None:
        """A send's wait for its receiver's free buffer: park to final try (monotonic s)."""
        begun = timeline.seconds_to_us(started_s)
        self.stream.complete(RESTOCK_TRACK, timeline.CAT_RESTOCK, "restock window", begun,
                             timeline.seconds_to_us(ended_s) - begun, {
                                 "sender": self.capture.guest_name(sender),
                                 "receiver": self.capture.guest_name(receiver),
                                 "final try": outcome})

    def flush(self) -> None:
        self.stream.flush(force=False)

    def close(self) -> None:
        self.stream.close()
