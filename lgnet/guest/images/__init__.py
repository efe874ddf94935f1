"""The guest kernel images that ship inside the package (built from lgnet/guest/kernel/).

`bundled` names the default one wherever a KERNEL is expected: `lgnet launch 32 bundled ...`
or `kernel: bundled` in a scenario.
"""
from pathlib import Path

BUNDLED_NAME = "bundled"
BUNDLED_KERNEL = Path(__file__).with_name("lguest-vmlinux")


def resolve_kernel(name: str) -> str:
    return str(BUNDLED_KERNEL) if name == BUNDLED_NAME else name
