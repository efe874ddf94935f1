"""The dma_hash view: what the Host knows about every binding, as plain data.

Rules of this file: it only looks. It is sans-IO like the engine (fabric/dma.py) and never
changes a guest, a binding or a counter: a receive buffer's used_len is read through
`GuestMemory.gather`, which refuses a bad range instead of killing the guest as lgread would
(an inspector must not be a guest's death). The caller holds lguest_lock around `snapshot`,
so the picture is one moment between two engine operations.

What lguest kept per binding (struct lguest_dma_info): the key, the guest-physical address of
the array of struct lguest_dma, how many there are, the next_dma cursor and the interrupt to
raise. Each buffer is free (used_len 0: armed, waiting for a frame) or used (used_len = the
bytes a sender put there, until the guest consumes the frame and re-arms it). Chains are
listed in bucket order and, within a chain, in lookup order (the head first): the order in
which send_dma meets them.
"""
from __future__ import annotations

from lgnet import abi
from lgnet.fabric.dma import Binding, Engine, Guest


def snapshot(engine: Engine) -> dict:
    """{"bindings": [...], "guests": [...]}: every live binding and every guest the engine
    holds. Shared keys carry their file identity (`space`, the net file's (st_dev, st_ino))
    and offset; naming the net is for whoever knows which file is which."""
    bindings = []
    for chain, entries in enumerate(engine.dma_hash):
        for position, binding in enumerate(entries):
            bindings.append(binding_row(chain, position, binding))
    guests = [guest_row(g) for g in engine.guests if g is not None]
    return {"bindings": bindings, "guests": guests}


def binding_row(chain: int, position: int, binding: Binding) -> dict:
    key = binding.key
    space = list(key.space) if isinstance(key.space, tuple) else key.space
    return {"chain": chain, "position": position, "guest": binding.guest.id,
            "pid": binding.guest.owner,
            "key": {"shared": key.shared, "space": space, "offset": key.offset},
            "dmas": binding.dmas,
            "num_dmas": binding.num_dmas, "next_dma": binding.next_dma,
            "interrupt": binding.interrupt, "used_len": used_lens(binding)}


def used_lens(binding: Binding) -> list[int | None]:
    """used_len of each struct lguest_dma of the array; None where the guest's memory does
    not back the entry (the engine kills the guest only if a send ever reaches it)."""
    memory = binding.guest.memory
    out: list[int | None] = []
    for index in range(binding.num_dmas):
        addr = binding.dmas + index * abi.LGUEST_DMA_SIZE + abi.DMA_USED_LEN_OFFSET
        word = memory.gather(addr, 4)
        out.append(None if word is None else int.from_bytes(word, "little"))
    return out


def guest_row(guest: Guest) -> dict:
    return {"guest": guest.id, "pid": guest.owner, "dead": guest.dead,
            "irqs_pending": guest.irqs_pending,
            "pending_dma": list(guest.pending_dma) if guest.pending_dma else None}
