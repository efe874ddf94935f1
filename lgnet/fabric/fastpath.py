"""Which per-frame path the DMA engine runs: the compiled one, or the Python reference.

Rules of this file: it decides and says why, once per process; it does no DMA. The compiled
path (fabric/_fastdma.c, built by `pip install` where a C compiler exists) is an accelerator
of fabric/dma.py's rules, never a second rulebook (DESIGN rule 9): it takes the common
SEND_DMA and leaves everything else to Python. It is used unless it was not built, or
LGNET_PYTHON_PATH is set to anything but "" or "0" (to measure or debug the reference).

Every lguest number the C code needs is handed to it here, from abi.py, at import.
"""
from __future__ import annotations

import os
from types import ModuleType

from lgnet import abi

ENV = "LGNET_PYTHON_PATH"


def _load() -> tuple[ModuleType | None, str]:
    try:
        from lgnet.fabric import _fastdma
    except ImportError as error:
        return None, "no compiled extension: %s" % error
    from lgnet.fabric.dma import Send           # dma.py imports us: import it only now
    from lgnet.fabric.memory import GuestMemory
    _fastdma.configure({
        name: getattr(abi, name) for name in (
            "LGUEST_DMA_SIZE", "DMA_USED_LEN_OFFSET", "DMA_ADDR_OFFSET", "DMA_LEN_OFFSET",
            "LGUEST_MAX_DMA_SECTIONS", "PAGE_SIZE", "BIND_NUM_MASK", "HCALL_STATUS_EMPTY",
            "LHCALL_SEND_DMA", "LHCALL_RING_SIZE", "LGUEST_IRQS", "U32_MASK")
    } | {"ASYNC_HCALL_SIZE": abi.ASYNC_HCALL.size, "DELIVERED": Send.DELIVERED,
         "GuestMemory": GuestMemory, "LguestDma": abi.LguestDma})
    return _fastdma, ""


_loaded: tuple[ModuleType | None, str] | None = None


def compiled_module() -> ModuleType | None:
    """The configured extension, or None where it was not built."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def forced_python() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def default() -> ModuleType | None:
    """What an Engine uses unless told: the extension, unless it is absent or refused."""
    return None if forced_python() else compiled_module()


def describe() -> tuple[str, str]:
    """("compiled", "") or ("python", why): for `lgnet --version`, `lgnet bench`, the broker."""
    if forced_python():
        return "python", "forced by %s=%s" % (ENV, os.environ[ENV])
    if compiled_module() is None:
        return "python", _loaded[1]
    return "compiled", ""


def label() -> str:
    """'compiled', or 'python (why)'."""
    path, why = describe()
    return path if not why else "%s (%s)" % (path, why)
