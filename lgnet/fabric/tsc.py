"""The host's TSC rate, as LGUEST_INIT tells it to the guest (lguest_data.tsc_khz).

Rules of this file: lguest wrote the Host kernel's `tsc_khz` when the TSC was constant and
not marked unstable (`boot_cpu_has(X86_FEATURE_CONSTANT_TSC) && !check_tsc_unstable()`),
else 0, so that a guest never trusts a TSC that drifts. From user space lgnet decides the
same way with what Linux shows:

- constant: the `constant_tsc` flag in /proc/cpuinfo (X86_FEATURE_CONSTANT_TSC itself);
- not unstable: the kernel's current clocksource is `tsc`. A kernel that marks its TSC
  unstable switches to another clocksource, so this holds only while it trusts the TSC (a
  host that simply prefers another clocksource gets 0 too: the cautious answer). No
  `nonstop_tsc` is asked for, as lguest asked for none: a TSC that stops in deep C-states
  gets marked unstable by the kernel, and then it is no longer the clocksource;
- the rate: the first "cpu MHz" of /proc/cpuinfo, in kHz. The kernel's calibrated tsc_khz
  is not shown to user space; "cpu MHz" is the CPU's clock (the kernel's cpu_khz, or the
  speed it measured just now), which is the TSC's rate on a constant-TSC host running at its
  nominal speed (in a VM, usually exactly) and may differ on a host that scales its clock.

The broker reads it once, at start (this is I/O: the engine only carries the number).
"""
from __future__ import annotations

CPUINFO = "/proc/cpuinfo"
CURRENT_CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
CONSTANT_TSC_FLAG = "constant_tsc"
TSC_CLOCKSOURCE = "tsc"


def tsc_khz_from(cpuinfo: str, clocksource: str) -> int:
    """The rate to tell guests, from the text of /proc/cpuinfo and the current clocksource;
    0 when the TSC is not to be trusted or no rate is shown."""
    flags: set[str] = set()
    mhz = None
    processors = 0
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip()
        if name == "processor":
            processors += 1
            if processors > 1:
                break                  # boot_cpu_has: the first processor's block decides
        elif name == "flags":
            flags = set(value.split())
        elif name == "cpu MHz":
            try:
                mhz = float(value)
            except ValueError:
                return 0
    if CONSTANT_TSC_FLAG not in flags or clocksource.strip() != TSC_CLOCKSOURCE or not mhz:
        return 0
    return round(mhz * 1000)


def host_tsc_khz() -> int:
    """This host's answer (0 where the files cannot be read: no TSC to speak of)."""
    try:
        with open(CPUINFO) as f:
            cpuinfo = f.read()
        with open(CURRENT_CLOCKSOURCE) as f:
            clocksource = f.read()
    except OSError:
        return 0
    return tsc_khz_from(cpuinfo, clocksource)
