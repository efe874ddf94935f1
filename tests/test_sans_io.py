"""Rule 2 of the house: the engine is sans-IO. Importing it (and its pure neighbours) must not
import any module that does processes, threads or sockets. `-S` keeps the interpreter's own
start-up (site) from importing threading before we look."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IO_MODULES = ("socket", "multiprocessing", "threading", "selectors", "subprocess", "asyncio")


def test_importing_the_engine_imports_no_io_module():
    code = ("import sys; sys.path.insert(0, %r); import lgnet.fabric.dma, "
            "lgnet.fabric.hypercalls, lgnet.fabric.devlguest, lgnet.fabric.wakeups; "
            "print(','.join(m for m in %r if m in sys.modules))" % (str(REPO), IO_MODULES))
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
