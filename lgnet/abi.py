"""The lguest 2.6.23 ABI, in one place.

Rules of this file: it imports nothing of lgnet, and every lguest number lives here and
nowhere else. Guest and Host alike read their constants, struct layouts and messages from
this module, so the two sides cannot drift apart.

The layouts are i386: little-endian, 4-byte longs and pointers, natural alignment. Where the
reference Launcher of July 2007 and the 2.6.23 release differ, the reference Launcher wins.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
U32_MASK = 0xFFFFFFFF

# --- §1 DMA descriptors -------------------------------------------------------------------

LGUEST_MAX_DMA_SECTIONS = 16   # addr/len pairs in one struct lguest_dma
LGUEST_MAX_DMA = 32            # DMA arrays one guest may have bound at once
LGUEST_IRQS = 32               # virtual interrupt lines; 0 is the timer
DMA_HASH_BUCKETS = 61          # the Host's one global dma_hash
# lguest's host table held 16 guests; lgnet raises it so one net can be full: as many
# guests as a net page has slots (MAX_GUESTS, below NET_SLOTS). The guest id is still the
# index in this table (from a base the Host may be given: GUEST_ID_LIMIT).
LGUEST_MAX_GUESTS_2623 = 16
# lguest_data.guestid is a u16, and lguest_net's MAC is 02:00:<guestid le16>:00:00: unique on
# one Host. Labs whose nets an uplink joins number their guests from bases apart (lgnet's own).
GUEST_ID_LIMIT = 1 << 16
LGUEST_CONSOLE_DMA_KEY = 0
TIMER_IRQ = 0

# struct lguest_dma { u32 used_len; u32 addr[16]; u16 len[16]; }
LGUEST_DMA = struct.Struct("<I%dI%dH" % (LGUEST_MAX_DMA_SECTIONS, LGUEST_MAX_DMA_SECTIONS))
LGUEST_DMA_SIZE = LGUEST_DMA.size                  # 100, also the stride of arrays
DMA_USED_LEN_OFFSET = 0
DMA_ADDR_OFFSET = 4
DMA_LEN_OFFSET = DMA_ADDR_OFFSET + 4 * LGUEST_MAX_DMA_SECTIONS   # 68


@dataclass(frozen=True)
class LguestDma:
    """One decoded struct lguest_dma: the pieces end at the first zero length."""
    used_len: int
    addr: tuple[int, ...]
    len: tuple[int, ...]

    def pieces(self) -> list[tuple[int, int]]:
        out = []
        for addr, length in zip(self.addr, self.len):
            if length == 0:
                break
            out.append((addr, length))
        return out

    @property
    def total(self) -> int:
        return sum(length for _, length in self.pieces())


def unpack_dma(raw: bytes | memoryview) -> LguestDma:
    fields = LGUEST_DMA.unpack(raw)
    n = LGUEST_MAX_DMA_SECTIONS
    return LguestDma(fields[0], tuple(fields[1:1 + n]), tuple(fields[1 + n:]))


def pack_dma(pieces: list[tuple[int, int]], used_len: int = 0) -> bytes:
    """A struct lguest_dma for up to 16 (addr, len) pieces; the rest are zero."""
    if len(pieces) > LGUEST_MAX_DMA_SECTIONS:
        raise ValueError("a struct lguest_dma holds at most %d pieces" % LGUEST_MAX_DMA_SECTIONS)
    pad = LGUEST_MAX_DMA_SECTIONS - len(pieces)
    addrs = [a for a, _ in pieces] + [0] * pad
    lens = [n for _, n in pieces] + [0] * pad
    return LGUEST_DMA.pack(used_len, *addrs, *lens)


# BIND_DMA packs the array length and the interrupt into one register.
BIND_NUM_SHIFT = 8
BIND_IRQ_MASK = 0xFF
BIND_NUM_MASK = 0xFFFF


def bind_dma_arg(num: int, irq: int) -> int:
    return (num << BIND_NUM_SHIFT) | irq


def split_bind_arg(arg: int) -> tuple[int, int]:
    """(num_dmas, irq) as the Host reads them: num is a u16, irq a u8."""
    return (arg >> BIND_NUM_SHIFT) & BIND_NUM_MASK, arg & BIND_IRQ_MASK


# --- §2 Keys ------------------------------------------------------------------------------

KEY_ALIGN = 4                   # futex keys are u32 addresses
JHASH_GOLDEN_RATIO = 0x9E3779B9

# --- §3 Host messages (kill reasons, printf-style as lguest wrote them) ---------------------

# core.c's accessors each had their words: lgread_u32/lgwrite_u32 name the address, lgread/
# lgwrite the address and length.
MSG_BAD_READ = "bad read address %#lx"                  # lgread_u32
MSG_BAD_READ_LEN = "bad read address %#lx len %u"       # lgread
MSG_BAD_WRITE = "bad write address %#lx len %u"         # lgwrite
MSG_BAD_WRITE_U32 = "bad write address %#lx"            # lgwrite_u32
MSG_BAD_DMA_ENTRY = "bad DMA entry: %u@%#lx"
MSG_BAD_BIND_KEY = "bad dma key %#lx"
MSG_BAD_SEND_KEY = "bad sending DMA key"
MSG_BAD_GETDMA_KEY = "bad registered DMA buffer"
MSG_BAD_SEND_ADDRESS = "bad address in sending DMA"
MSG_BAD_DMA_PAGES = "Error mapping DMA pages"
MSG_BAD_REGISTERED_READ = "bad address in registered DMA struct"
MSG_BAD_REGISTERED_WRITE = "bad address writing to registered DMA"
MSG_BAD_ASYNC_FETCH = "Fetching async hypercalls"
MSG_CRASH = "CRASH: %s"
# hypercalls.c printed eax with %li: format signed_long(eax), so 0xFFFFFFFF reads "-1".
MSG_NO_INIT = "hypercall %li before LGUEST_INIT"
MSG_DOUBLE_INIT = "already have lguest_data"
MSG_BAD_HYPERCALL = "Bad hypercall %li"                 # lguest's own ends in "\n"
# LGUEST_INIT's lguest_data out of bounds, or unwritable: 2.6.23's %p printed a pointer as
# eight zero-padded hex digits without "0x".
MSG_BAD_LGUEST_DATA = "bad guest page %08x"
MSG_GUEST_FAULT = "guest fault at EIP %#x: %s"
MSG_POWER_DOWN = "Power down"
CRASH_MESSAGE_MAX = 128



def signed_long(value: int) -> int:
    """An i386 register as C's %li printed it: a signed 32-bit long."""
    value &= U32_MASK
    return value - (1 << 32) if value & 0x80000000 else value


# --- §4 Hypercalls ------------------------------------------------------------------------

LGUEST_TRAP_ENTRY = 0x1F
LHCALL_FLUSH_ASYNC = 0
LHCALL_LGUEST_INIT = 1
LHCALL_CRASH = 2
LHCALL_LOAD_GDT = 3
LHCALL_NEW_PGTABLE = 4
LHCALL_FLUSH_TLB = 5
LHCALL_LOAD_IDT_ENTRY = 6
LHCALL_SET_STACK = 7
LHCALL_TS = 8
LHCALL_SET_CLOCKEVENT = 9
LHCALL_HALT = 10
LHCALL_BIND_DMA = 12
LHCALL_SEND_DMA = 13
LHCALL_SET_PTE = 14
LHCALL_SET_PMD = 15
LHCALL_LOAD_TLS = 16

HYPERCALL_NAMES = {
    LHCALL_FLUSH_ASYNC: "FLUSH_ASYNC", LHCALL_LGUEST_INIT: "LGUEST_INIT",
    LHCALL_CRASH: "CRASH", LHCALL_LOAD_GDT: "LOAD_GDT", LHCALL_NEW_PGTABLE: "NEW_PGTABLE",
    LHCALL_FLUSH_TLB: "FLUSH_TLB", LHCALL_LOAD_IDT_ENTRY: "LOAD_IDT_ENTRY",
    LHCALL_SET_STACK: "SET_STACK", LHCALL_TS: "TS", LHCALL_SET_CLOCKEVENT: "SET_CLOCKEVENT",
    LHCALL_HALT: "HALT", LHCALL_BIND_DMA: "BIND_DMA", LHCALL_SEND_DMA: "SEND_DMA",
    LHCALL_SET_PTE: "SET_PTE", LHCALL_SET_PMD: "SET_PMD", LHCALL_LOAD_TLS: "LOAD_TLS",
}

# The asynchronous hypercall ring inside struct lguest_data.
LHCALL_RING_SIZE = 64
HCALL_STATUS_EMPTY = 0xFF
HCALL_STATUS_PENDING = 0
ASYNC_HCALL = struct.Struct("<4I")          # {eax, edx, ebx, ecx}

# struct lguest_data (v2.6.23, i386): offsets of the fields the Host touches.
LGUEST_DATA_IRQ_ENABLED = 0
LGUEST_DATA_BLOCKED_INTERRUPTS = 4
LGUEST_DATA_CR2 = 8
LGUEST_DATA_TIME = 12                       # struct timespec {tv_sec, tv_nsec}
LGUEST_DATA_HCALL_STATUS = 20
LGUEST_DATA_HCALLS = LGUEST_DATA_HCALL_STATUS + LHCALL_RING_SIZE          # 84
LGUEST_DATA_RESERVE_MEM = LGUEST_DATA_HCALLS + LHCALL_RING_SIZE * ASYNC_HCALL.size   # 1108
LGUEST_DATA_GUESTID = 1112
LGUEST_DATA_TSC_KHZ = 1116
LGUEST_DATA_NOIRQ_START = 1120
LGUEST_DATA_NOIRQ_END = 1124
LGUEST_DATA_SIZE = 1128
IRQ_ENABLED_ON = 0x200                      # X86_EFLAGS_IF
FIRST_EXTERNAL_VECTOR = 32                  # irq n arrives on vector 32 + n
TIMESPEC = struct.Struct("<II")

# --- §5 /dev/lguest -----------------------------------------------------------------------

LHREQ_INITIALIZE = 0
LHREQ_GETDMA = 1
LHREQ_IRQ = 2
LHREQ_BREAK = 3
LHREQ_NAMES = {LHREQ_INITIALIZE: "INITIALIZE", LHREQ_GETDMA: "GETDMA",
               LHREQ_IRQ: "IRQ", LHREQ_BREAK: "BREAK"}
INITIALIZE_ARGS = struct.Struct("<4I")       # pfn_limit, pgdir, start, page_offset
INITIALIZE_RESULT = INITIALIZE_ARGS.size     # write() returns the bytes it used: 16
PENDING_DMA = struct.Struct("<2I")           # what read() returns: [dma address, key]

# --- §6 Devices ---------------------------------------------------------------------------

LGUEST_DEVICE_DESC = struct.Struct("<HHHHI")   # type, features, status, num_pages, pfn
LGUEST_DEVICE_DESC_SIZE = LGUEST_DEVICE_DESC.size   # 12
DESC_STATUS_OFFSET = 4
LGUEST_DEVICE_T_NONE = 0
LGUEST_DEVICE_T_CONSOLE = 1
LGUEST_DEVICE_T_NET = 2
LGUEST_DEVICE_T_BLOCK = 3
DEVICE_TYPE_NAMES = {LGUEST_DEVICE_T_CONSOLE: "console", LGUEST_DEVICE_T_NET: "net",
                     LGUEST_DEVICE_T_BLOCK: "block"}
LGUEST_NET_F_NOCSUM = 0x4000
LGUEST_DEVICE_F_RANDOMNESS = 0x8000
NET_SLOT_FEATURE_MASK = 0x3FFF               # the low feature bits of a net device: its slot
LGUEST_DEVICE_S_ACKNOWLEDGE = 1
LGUEST_DEVICE_S_DRIVER = 2
LGUEST_DEVICE_S_DRIVER_OK = 4
LGUEST_DEVICE_S_REMOVED = 8
LGUEST_DEVICE_S_REMOVED_ACK = 16
LGUEST_DEVICE_S_FAILED = 128
# "Assume each one wants up to two dma arrays per device": the Launcher's table of
# descriptors, and the Guest's scan of it, stop at LGUEST_MAX_DMA / 2.
MAX_DEVICES = LGUEST_MAX_DMA // 2

# The reference Launcher sits at 0xB8000000; everything below is guest-physical, and device
# pages are handed out downward from there.
NSEC_PER_SEC = 1_000_000_000                 # the clock's unit (timespec, clock events)
LGUEST_GUEST_TOP = 0xB8000000
GUEST_PFN_LIMIT = LGUEST_GUEST_TOP // PAGE_SIZE

# The net page: 682 six-byte MAC slots. mac[0] == 0 means unused; its bit 0 (the multicast
# bit) set means "promiscuous: send me everything".
ETH_ALEN = 6
NET_SLOTS = PAGE_SIZE // ETH_ALEN            # 682
MAX_GUESTS = NET_SLOTS                       # the Host's guest table (lguest's held 16)
NET_PROMISC_BIT = 0x01
NET_PEER_KEY_STRIDE = 4                      # key of slot n = page address + 4 * n
ETH_HLEN = 14
ETH_ZLEN = 60                                # the shortest frame: lguest_net pads up to it
ETH_DATA_LEN = 1500
ETH_FRAME_LEN = ETH_HLEN + ETH_DATA_LEN      # 1514: one lguest_net receive buffer
NUM_NET_RX_BUFFERS = 8                       # lguest_net binds 8 receive buffers
TUN_HOST_SLOT = 0                            # --tunnet: the host's MAC sits in slot 0
TUN_GUEST_SLOT = 1                           # NET_PEERNUM: the guest is slot 1
BROADCAST_MAC = b"\xff" * ETH_ALEN
LGUEST_MAC_PREFIX = b"\x02\x00"              # lguest_net: 02:00:<guestid le16>:00:00
NET_FILE_MODE = 0o600                        # --sharenet creates a missing net file 0600
# lgnet's own (not lguest's): the ethertype of the Python driver's test frames, IEEE's "local
# experimental" one. Here because both wings and the filters' `lgnet` word need it.
ETHERTYPE_LGNET = 0x88B5


def peer_key(net_page: int, slot: int) -> int:
    return net_page + NET_PEER_KEY_STRIDE * slot


def guest_mac(guest_id: int) -> bytes:
    return LGUEST_MAC_PREFIX + struct.pack("<H", guest_id) + b"\0\0"


def is_multicast(mac: bytes) -> bool:
    return bool(mac[0] & NET_PROMISC_BIT)


# struct lguest_block_page: type int, sector u32, bytes u32, result int, num_sectors u32
LGUEST_BLOCK_PAGE = struct.Struct("<iIIiI")
BLOCK_TYPE_READ = 0
BLOCK_TYPE_WRITE = 1
BLOCK_RESULT_PENDING = 0
BLOCK_RESULT_DONE = 1
BLOCK_RESULT_ERROR = 2
BLOCK_RESULT_OFFSET = 12
SECTOR_SIZE = 512

CONSOLE_INPUT_BYTES = 256                    # the console binds one 256-byte input buffer
CTRL_C = 3
CONSOLE_ABORT_PRESSES = 3                    # three ^C within about a second end the Launcher
CONSOLE_ABORT_SECONDS = 1

# --- §7 Boot ------------------------------------------------------------------------------

LGUEST_MAGIC = b"GenuineLguest"
PAGE_PRESENT = 0x7                           # present, writable, user/exec
PTES_PER_PAGE = PAGE_SIZE // 4
PGDIR_SHIFT = 22
BOOT_E820_COUNT = 0x1E8
BOOT_E820_MAP = 0x2D0
E820_ENTRY = struct.Struct("<QQI")           # addr, size, type
E820_RAM = 1
BOOT_LOADER_TYPE = 0x210
BOOT_LOADER_UNKNOWN = 0xFF
BOOT_INITRD_START = 0x218
BOOT_INITRD_SIZE = 0x21C
BOOT_CMDLINE_PTR = 0x228
BOOT_CMDLINE = 4096                          # the command line itself, after the header
CMDLINE_MAX = PAGE_SIZE                      # lgnet's: its page, NUL included (what a guest reads)
BOOT_PARAVIRT_TYPE = 0x23C
PARAVIRT_LGUEST = 1
BOOT_EFLAGS = 0x202
GUEST_PL = 1                                 # the guest kernel runs in ring 1

# The guest's CPU (lgnet/guest/cpu.py). lguest's Switcher sat at the top of every address
# space, above anything the guest may map: one page-directory entry (the last) belongs to the
# Host, and the guest is told to keep clear of it (lguest_data.reserve_mem).
SWITCHER_ADDR = 0xFFC00000                   # physical = virtual, above LGUEST_GUEST_TOP
SWITCHER_PGD_INDEX = SWITCHER_ADDR >> PGDIR_SHIFT         # 1023
SWITCHER_RESERVE = (1 << 32) - SWITCHER_ADDR              # 4 MiB: lguest_data.reserve_mem
GDT_ENTRIES = 32                             # Linux i386's GDT
GDT_ENTRY_TLS_MIN = 6                        # LOAD_TLS fills entries 6..8
GDT_ENTRY_TLS_ENTRIES = 3
GDT_ENTRY_LGUEST_CS = 10                     # the Host's own ring-0 segments
GDT_ENTRY_LGUEST_DS = 11
GDT_ENTRY_KERNEL_CS = 12                     # the guest kernel's flat segments, DPL 1
GDT_ENTRY_KERNEL_DS = 13
GDT_ENTRY_TSS = 16
GDT_ENTRY_DOUBLEFAULT_TSS = 31
LGUEST_CS = GDT_ENTRY_LGUEST_CS << 3
LGUEST_DS = GDT_ENTRY_LGUEST_DS << 3
LGUEST_KERNEL_CS = (GDT_ENTRY_KERNEL_CS << 3) | GUEST_PL   # 0x61
LGUEST_KERNEL_DS = (GDT_ENTRY_KERNEL_DS << 3) | GUEST_PL   # 0x69
IDT_ENTRIES = FIRST_EXTERNAL_VECTOR + LGUEST_IRQS           # lguest kept 64 gates (+ syscall)
SYSCALL_VECTOR = 0x80
IDT_IGNORED_VECTORS = (2, 8, 15, LGUEST_TRAP_ENTRY)       # NMI, double fault, spurious, hcall
IDT_INTERRUPT_GATE = 0xE                     # clears irq_enabled on entry
IDT_TRAP_GATE = 0xF
STACK_PAGES_MAX = 2                          # SET_STACK: a kernel stack of at most 2 pages
X86_CR0_PE = 0x1
X86_CR0_WP = 0x10000                         # ring 1 honours read-only pages
X86_CR0_PG = 0x80000000
X86_CR0_TS = 0x8                             # set while the guest asked for TS: FPU -> #NM
# Traps (interrupts_and_traps.c, core.c's run_guest). The CPU pushes an error code for these
# (has_err()); the Host itself handles #GP (in/out emulation), #PF (cr2) and #NM (TS), so
# those, its hypercall trap and interrupt gates never go straight to the guest (direct_trap).
TRAP_INVALID_OPCODE = 6
TRAP_DEVICE_NOT_AVAILABLE = 7
TRAP_GENERAL_PROTECTION = 13
TRAP_PAGE_FAULT = 14
TRAPS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17})
TRAPS_THE_HOST_TAKES = frozenset({TRAP_DEVICE_NOT_AVAILABLE, TRAP_GENERAL_PROTECTION,
                                  TRAP_PAGE_FAULT, LGUEST_TRAP_ENTRY})
GP_ERROR_IDT = 0x2                           # a #GP error code names an IDT vector: n << 3 | 2
MSG_UNHANDLED_TRAP = "unhandled trap %i at %s (%s)"     # lguest's "%li at %#lx (%#lx)"

MSG_BAD_IDT_TYPE = "bad IDT type %i"
MSG_TOO_MANY_GDT = "too many gdt entries %i"
MSG_BAD_STACK_SEGMENT = "bad stack segment %i"
MSG_BAD_STACK_PAGES = "bad stack pages %u"
MSG_BAD_PGDIR = "bad page directory %#x"     # lgnet's wording: lguest shadowed instead
KERNEL_LOAD_ADDRESS = 0x100000               # vmlinux is loaded at physical 1 MiB
DEFAULT_PAGE_OFFSET = 0xC0000000
GZIP_ID1 = 0x1F                              # a gzip header starts 1F 8B <method> ...
GZIP_ID2 = 0x8B
GZIP_OS_OFFSET = 9                           # ... and byte 9 says where it was compressed
BZIMAGE_GZIP_OS_UNIX = 3                     # the only OS byte the Launcher accepts
MOVL_ABS_OPCODE = 0xA1                       # "movl addr, %eax": page_offset guessing
# intuit_page_offset returns when `++possibilities[byte] > 3`: on the fourth sighting (its
# comment says "appears three times"; the code wins).
PAGE_OFFSET_SIGHTINGS = 4
MiB = 1024 * 1024

MSG_MALFORMED_ELF = "Malformed elf header"
MSG_PAGE_OFFSET_DIFFERENT = "Page offset of section %i different"
MSG_NOT_LGUEST = "Is this image a genuine lguest?"
MSG_NO_PAGE_OFFSET = "could not determine page offset"
MSG_NO_BZIMAGE_KERNEL = "Could not find kernel in bzImage"
MSG_READING_KERNEL = "Reading kernel"                  # err(): ": <why>" follows
MSG_READING_PHDRS = "Reading program headers"
MSG_READING_BZIMAGE = "reading image from bzImage"
MSG_TOO_MANY_DEVICES = "too many devices"
MSG_NO_FREE_SLOTS = "No free slots in network file %s"
MSG_CANNOT_OPEN_NET_FILE = "cannot open net file '%s'"   # err(): ": <strerror>" follows


def c_hex(value: int) -> str:
    """C's "%#lx", as lguest's messages print it: 0 is plain "0", not "0x0"."""
    return "%#x" % value if value else "0"
