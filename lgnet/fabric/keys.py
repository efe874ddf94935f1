"""DMA keys: lguest's futex-key trick.

A guest names a DMA endpoint by an address. The Host turns that address into an identity the
way futexes do, so that two guests mapping the same net file agree on it wherever each maps
the file:

- in a *shared* region (a net file): (file identity, offset in the file);
- anywhere else (*private*): (this guest, the address itself).

Keys must be 4-byte aligned (they are u32 futex addresses) and something must be mapped
behind them: get_futex_key failed for an address without a mapping (the hole above RAM,
0xC0000000), and the caller killed the guest. They are not checked against pfn_limit: only
DMA *buffers* are. The identity is hashed into dma_hash's 61 buckets with the
Jenkins hash the kernel used (jhash2, the lookup2 variant of 2.6.23), never Python's hash(),
so the chains — and the "first entry on the chain" rules that depend on their order — are the
kernel's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from lgnet import abi
from lgnet.fabric.memory import GuestMemory

_M = abi.U32_MASK
KEY_CACHE_MAX = 4096                   # resolved keys remembered per guest memory


@dataclass(frozen=True, slots=True)
class Key:
    """A resolved DMA key.

    `space` is the file identity (shared: a tuple of ints such as (st_dev, st_ino)) or the
    guest id (private)."""
    shared: bool
    space: int | tuple[int, ...]
    offset: int
    # bucket()'s memo: jhash2 in Python costs microseconds, a key never changes.
    hash_bucket: int = field(default=-1, compare=False, repr=False)

    def words(self) -> list[int]:
        """The u32 words jhash2 runs over (like union futex_key's word/ptr/offset)."""
        space = self.space if isinstance(self.space, tuple) else (self.space,)
        words = []
        for part in space:
            words += [part & _M, (part >> 32) & _M]
        # futex keys mark shared keys with the low bit of the offset word.
        return words + [(self.offset << 1 | self.shared) & _M]


def resolve(memory: GuestMemory, guest_id: int, addr: int) -> Key | None:
    """get_futex_key: None for a misaligned or unmapped address (the caller kills the
    guest)."""
    if addr % abi.KEY_ALIGN:
        return None
    # The answer depends only on the layout (the memo is emptied when it changes) and, for a
    # private key, on the guest.
    key = memory.key_cache.get(addr)
    if key is not None and (key.shared or key.space == guest_id):
        return key
    region = memory.region_at(addr)
    if region is None:
        return None
    if region.shared is not None:
        key = Key(True, region.shared, addr - region.base)
    else:
        key = Key(False, guest_id, addr)
    if len(memory.key_cache) >= KEY_CACHE_MAX:
        memory.key_cache.clear()           # a guest naming endless keys gets no memo
    memory.key_cache[addr] = key
    return key


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    # __jhash_mix from include/linux/jhash.h (Bob Jenkins' lookup2).
    a = (a - b - c) & _M; a ^= c >> 13
    b = (b - c - a) & _M; b ^= (a << 8) & _M
    c = (c - a - b) & _M; c ^= b >> 13
    a = (a - b - c) & _M; a ^= c >> 12
    b = (b - c - a) & _M; b ^= (a << 16) & _M
    c = (c - a - b) & _M; c ^= b >> 5
    a = (a - b - c) & _M; a ^= c >> 3
    b = (b - c - a) & _M; b ^= (a << 10) & _M
    c = (c - a - b) & _M; c ^= b >> 15
    return a, b, c


def jhash2(words: list[int], initval: int = 0) -> int:
    """jhash2(k, length, initval) over u32 words."""
    a = b = abi.JHASH_GOLDEN_RATIO
    c = initval & _M
    k = list(words)
    while len(k) >= 3:
        a = (a + k[0]) & _M
        b = (b + k[1]) & _M
        c = (c + k[2]) & _M
        a, b, c = _mix(a, b, c)
        k = k[3:]
    c = (c + 4 * len(words)) & _M
    if len(k) == 2:
        b = (b + k[1]) & _M
    if len(k) >= 1:
        a = (a + k[0]) & _M
    a, b, c = _mix(a, b, c)
    return c


def bucket(key: Key) -> int:
    b = key.hash_bucket
    if b < 0:
        b = jhash2(key.words()) % abi.DMA_HASH_BUCKETS
        object.__setattr__(key, "hash_bucket", b)     # frozen: set once, like a cache
    return b
