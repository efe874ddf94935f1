"""The bundled guest kernel (lgnet/guest/kernel/): it builds from source, and what comes out
is a vmlinux the Launcher accepts, laid out as lguest's Guests of 2007 were.

Building needs stock gcc with -m32 and binutils; where gcc cannot build even a trivial 32-bit
object the build test skips and says why. The ABI header check needs no compiler.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from lgnet import abi
from lgnet.guest import loader
from lgnet.guest.loader import load_kernel

KERNEL_DIR = Path(loader.__file__).parent / "kernel"
BUNDLED = Path(loader.__file__).parent / "images" / "lguest-vmlinux"


def can_build_32bit(tmp: Path) -> str | None:
    """None if gcc -m32, ld and make work here, else the reason they do not."""
    for tool in ("gcc", "ld", "make"):
        if shutil.which(tool) is None:
            return "%s is not installed" % tool
    source = tmp / "probe.c"
    source.write_text("int probe(int x) { return x + 1; }\n")
    result = subprocess.run(["gcc", "-m32", "-ffreestanding", "-c", str(source),
                             "-o", str(tmp / "probe.o")], capture_output=True, text=True)
    if result.returncode != 0:
        return "gcc -m32 cannot build a 32-bit object here: %s" % result.stderr.strip()[:200]
    return None


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("kernel")
    reason = can_build_32bit(tmp)
    if reason:
        pytest.skip(reason)
    out = tmp / "lguest-vmlinux"
    result = subprocess.run(["make", "-C", str(KERNEL_DIR), "OUT=%s" % out,
                             "BUILD=%s" % (tmp / "build")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def check_layout(path: Path) -> None:
    """ET_EXEC, EM_386, PT_LOAD at physical 1 MiB with virtual = physical + 0xC0000000, and
    the magic immediately before the entry point the Launcher will find."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 32 and elf.little_endian
        assert elf.header.e_type == "ET_EXEC"
        assert elf.header.e_machine == "EM_386"
        loads = [seg.header for seg in elf.iter_segments() if seg.header.p_type == "PT_LOAD"]
    assert loads
    assert all(h.p_vaddr - h.p_paddr == abi.DEFAULT_PAGE_OFFSET for h in loads)
    assert min(h.p_paddr for h in loads) == abi.KERNEL_LOAD_ADDRESS

    kernel = load_kernel(path)
    assert kernel.page_offset == abi.DEFAULT_PAGE_OFFSET
    entry = kernel.entry - kernel.page_offset
    assert entry > abi.KERNEL_LOAD_ADDRESS
    text = dict(kernel.segments)[abi.KERNEL_LOAD_ADDRESS]
    at = entry - abi.KERNEL_LOAD_ADDRESS
    assert text[at - len(abi.LGUEST_MAGIC):at] == abi.LGUEST_MAGIC
    # Everything, bss included, stays well inside a small guest's RAM.
    assert kernel.end < abi.KERNEL_LOAD_ADDRESS + 4 * abi.MiB


def test_kernel_builds_from_source(built_kernel):
    check_layout(built_kernel)


def test_bundled_image_has_the_layout():
    check_layout(BUNDLED)


def test_lguest_h_mirrors_abi_py():
    """lguest.h is the kernel's copy of the ABI: every #define must say what abi.py says."""
    defines = re.findall(r"^#define[ \t]+([A-Z][A-Z0-9_]*)[ \t]+(\S.*?)[ \t]*$",
                         (KERNEL_DIR / "lguest.h").read_text(), re.MULTILINE)
    assert len(defines) > 50
    for name, value in defines:
        assert hasattr(abi, name), "%s is in lguest.h but not in abi.py" % name
        expected = getattr(abi, name)
        if value.startswith('"'):
            assert value.strip('"') == expected, name
        else:
            assert int(value, 0) == expected, name


def test_magic_in_head_s_is_abi_magic():
    head = (KERNEL_DIR / "head.S").read_text()
    assert '.ascii "%s"' % abi.LGUEST_MAGIC.decode() in head


@pytest.mark.timeout(60)
def test_the_rebuilt_kernel_boots_under_the_broker(built_kernel, guests):
    proc = guests.launch(kernel=str(built_kernel), args=["poweroff"])
    out = guests.finish(proc)
    assert proc.returncode == 0, out
    assert out.splitlines()[0] == "lguest: booting"
    assert "lguest: ready" in out
