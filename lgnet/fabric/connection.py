"""One launcher connection's state machine: every state it can be in, every input, one table.

Rules of this file: everything that decides what a connection's input means lives here, as
data; it imports nothing that does I/O and performs none (the broker owns the sockets, and
each action named here is one of the broker's methods). lguest_user.c's error codes are not
decided here but by the open file's gates (fabric/devlguest.py): where the table says
`refuse`, the gate's errno is the answer.

Theory of operation. A connection starts NEW. INITIALIZE makes it its guest's owner, RUNNING:
the guest runs in the launcher and comes to the Host with hypercalls. A HALT that finds
nothing pending leaves it HALTED until the engine raises an interrupt the guest has not
blocked (WAKE), kills it (DIED) or a BREAK kicks it out (BROKEN); a wake-up held back while
a sender runs is let go later (LET_GO). A NOTIFY puts its async ring on the broker's run list;
a run (RING) that stops at a DMA for the Launcher leaves it PENDING_DMA: the next hypercall
hears of it first. A send that found no free buffer leaves it RESTOCKING until its
receiver had its chance (RESTOCKED): meanwhile its requests wait unread. ATTACH makes a NEW
connection a sharer of another's guest (lguest's Waker), SHARING; its BREAK 1 waits,
BREAKING, until the owner's BREAK 0 (RELEASED). Once the guest is killed its owner is DEAD: every run
request hears why. HANGUP (or a request that makes no sense in the state) closes it: CLOSED.

The table maps (state, input) to (action, next state). A next state of None means the action
decides (a hypercall may halt, park or die) and returns it. An input with no entry for a
state takes the entry of `ANY`, and a request with neither is refused.
"""
from __future__ import annotations

from enum import Enum


class State(Enum):
    NEW = "new"                    # connected; no guest yet
    RUNNING = "running"            # owner; the guest runs in its launcher
    HALTED = "halted"              # owner; a HALT waits for something pending
    PENDING_DMA = "pending DMA"    # owner; a doorbell's run stopped at a DMA for the Launcher
    RESTOCKING = "restocking"      # owner; a send waits for its receiver's chance to restock
    SHARING = "sharing"            # acts for another launcher's guest (the Waker)
    BREAKING = "breaking"          # a sharer's BREAK 1, waiting for BREAK 0
    DEAD = "dead"                  # owner; its guest was killed
    CLOSED = "closed"


class Input(Enum):
    # wire requests
    INITIALIZE = "INITIALIZE"
    HCALL = "HCALL"
    NOTIFY = "NOTIFY"
    GETDMA = "GETDMA"
    IRQ = "IRQ"
    BREAK_ON = "BREAK 1"
    BREAK_OFF = "BREAK 0"
    ATTACH = "ATTACH"
    KILL = "KILL"
    STATS = "STATS"
    BROKER_STATS = "BROKER_STATS"
    BINDINGS = "BINDINGS"              # the dma_hash view: read-only, any connection
    NAME = "NAME"
    IMPAIR = "IMPAIR"
    UNKNOWN = "unknown request"
    HANGUP = "hangup"
    # what the engine (and the broker's loop) reports for this connection's guest
    WAKE = "wake"                  # an interrupt was raised
    DIED = "died"                  # the guest was killed
    RING = "ring"                  # the broker's turn to run its doorbell's queued calls
    LET_GO = "let go"              # a held wake-up is let go (its sender stopped, restock)
    BROKEN = "broken"              # a BREAK 1 arrived for its guest
    RELEASED = "released"          # the owner's BREAK 0 released a waiting BREAK 1
    RESTOCKED = "restocked"        # its parked send's receiver had its chance


REQUESTS = frozenset({Input.INITIALIZE, Input.HCALL, Input.NOTIFY, Input.GETDMA, Input.IRQ,
                      Input.BREAK_ON, Input.BREAK_OFF, Input.ATTACH, Input.KILL, Input.STATS,
                      Input.BROKER_STATS, Input.BINDINGS, Input.NAME, Input.IMPAIR,
                      Input.UNKNOWN,
                      Input.HANGUP})

ANY = None
S, I = State, Input

# (state, input): (action, next state or None: the action returns it, None for "unchanged")
TABLE: dict[tuple[State | None, Input], tuple[str, State | None]] = {
    # --- NEW: only INITIALIZE or ATTACH make sense -------------------------------------
    (S.NEW, I.ATTACH): ("attach", None),                  # SHARING, or an errno
    # --- RUNNING: the guest is running and asks --------------------------------------
    (S.RUNNING, I.HCALL): ("hypercall", None),            # RUNNING/HALTED/RESTOCKING/DEAD
    (S.RUNNING, I.NOTIFY): ("notify", None),              # no reply: the guest runs on
    (S.RUNNING, I.RING): ("run_ring", None),              # RUNNING/PENDING_DMA/RESTOCKING
    (S.RUNNING, I.KILL): ("kill", None),                  # the Launcher found a fault
    (S.RUNNING, I.DIED): ("nothing", S.DEAD),             # its next call hears why
    # --- HALTED: asleep until something it has not blocked is pending -----------------
    (S.HALTED, I.WAKE): ("wake", None),                   # RUNNING once answered
    (S.HALTED, I.LET_GO): ("let_go", None),
    (S.HALTED, I.RING): ("run_ring", None),               # its HALT drained it: clear the kick
    (S.HALTED, I.DIED): ("answer", None),                 # the HALT returns: dead
    (S.HALTED, I.BROKEN): ("answer", None),               # the HALT returns: again
    (S.HALTED, I.HCALL): ("close", S.CLOSED),             # a second call while one waits
    # --- PENDING_DMA: the next hypercall is told of the DMA first ---------------------
    (S.PENDING_DMA, I.HCALL): ("serve_pending_dma", S.RUNNING),
    (S.PENDING_DMA, I.KILL): ("kill", None),
    (S.PENDING_DMA, I.DIED): ("nothing", S.DEAD),
    # --- RESTOCKING: its requests wait unread ----------------------------------------------
    (S.RESTOCKING, I.RESTOCKED): ("resume", None),        # what came after the final try
    # --- SHARING / BREAKING: the Waker's connection --------------------------------------
    (S.BREAKING, I.RELEASED): ("reply_ok", S.SHARING),
    (S.BREAKING, I.BREAK_ON): ("close", S.CLOSED),        # a request while its BREAK waits
    (S.BREAKING, I.BREAK_OFF): ("close", S.CLOSED),
    # --- DEAD: every run request hears why ------------------------------------------------
    (S.DEAD, I.HCALL): ("answer", S.DEAD),
    (S.DEAD, I.KILL): ("kill", S.DEAD),                   # the first reason stays
    # --- in any other state -------------------------------------------------------------
    (ANY, I.INITIALIZE): ("initialize", None),            # RUNNING; or the gate's errno
    (ANY, I.ATTACH): ("refuse_busy", None),               # it already has a guest
    (ANY, I.HCALL): ("refuse_run", None),                 # NEW: EINVAL; a sharer: EPERM
    (ANY, I.KILL): ("refuse_run", None),
    (ANY, I.NOTIFY): ("decline_ring", None),              # no reply; it may ring again
    (ANY, I.GETDMA): ("getdma", None),                    # the gate decides who may
    (ANY, I.IRQ): ("irq", None),
    (ANY, I.BREAK_ON): ("break_on", None),                # BREAKING; or the gate's errno
    (ANY, I.BREAK_OFF): ("break_off", None),
    (ANY, I.STATS): ("stats", None),
    (ANY, I.BROKER_STATS): ("broker_stats", None),
    (ANY, I.BINDINGS): ("bindings", None),
    (ANY, I.NAME): ("name", None),
    (ANY, I.IMPAIR): ("impair", None),                    # the lab's; our own uid only
    (ANY, I.UNKNOWN): ("refuse_unknown", None),
    (ANY, I.HANGUP): ("close", S.CLOSED),
    (ANY, I.WAKE): ("nothing", None),                     # the flags are set: it sees them
    (ANY, I.DIED): ("nothing", None),                     # RESTOCKING: the resumed call tells
    (ANY, I.RING): ("nothing", None),                     # off the run list
    (ANY, I.LET_GO): ("nothing", None),
    (ANY, I.BROKEN): ("nothing", None),                   # its next reply says "again"
    (ANY, I.RELEASED): ("nothing", None),
    (ANY, I.RESTOCKED): ("nothing", None),
}


def transition(state: State, event: Input) -> tuple[str, State | None]:
    """The action for `event` in `state`, and the state after it (None: the action's)."""
    found = TABLE.get((state, event))
    if found is None:
        found = TABLE[(ANY, event)]
    return found


def running(state: State) -> bool:
    """Is the guest behind this connection running (likely to send more)?"""
    return state is S.RUNNING or state is S.PENDING_DMA or state is S.RESTOCKING
