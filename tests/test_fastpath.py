"""Which per-frame path runs (fabric/fastpath.py), and that the compiled one cannot silently
go missing where it can be built."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from enginekit import Kit, NetFile
from lgnet.fabric import fastpath
from lgnet.fabric.dma import Engine, Send

REPO = Path(__file__).resolve().parent.parent


def compiler() -> str | None:
    """The C compiler setuptools would use, if this machine has it."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


def test_the_extension_is_built_wherever_a_compiler_exists():
    if compiler() is None:
        pytest.skip("no C compiler: lgnet runs on the Python path here, as it should")
    assert fastpath.compiled_module() is not None, (
        "a C compiler exists but the compiled per-frame path is missing (%s): "
        "`pip install -e .` builds it" % fastpath.describe()[1])


def test_the_compiled_path_is_the_default_and_the_variable_forces_python(monkeypatch):
    if fastpath.compiled_module() is None:
        pytest.skip("the compiled per-frame path was not built")
    for value in ("", "0"):
        monkeypatch.setenv(fastpath.ENV, value)
        assert fastpath.describe() == ("compiled", "")
        assert Engine().compiled is fastpath.compiled_module()
    monkeypatch.setenv(fastpath.ENV, "1")
    assert fastpath.describe() == ("python", "forced by LGNET_PYTHON_PATH=1")
    assert fastpath.label() == "python (forced by LGNET_PYTHON_PATH=1)"
    assert Engine().compiled is None
    assert Engine(compiled=True).compiled is fastpath.compiled_module()   # asked for: given
    assert Engine(compiled=False).compiled is None


def test_without_the_extension_the_reason_is_said(monkeypatch):
    monkeypatch.delenv(fastpath.ENV, raising=False)
    monkeypatch.setattr(fastpath, "_loaded", (None, "no compiled extension: No module named x"))
    assert fastpath.describe() == ("python", "no compiled extension: No module named x")
    assert Engine().compiled is None
    with pytest.raises(ValueError, match="no compiled extension"):
        Engine(compiled=True)


def test_configure_wants_every_number_from_abi():
    module = fastpath.compiled_module()
    if module is None:
        pytest.skip("the compiled per-frame path was not built")
    with pytest.raises(KeyError, match="LGUEST_DMA_SIZE"):
        module.configure({})
    # A table it refused leaves the one it had: frames still take the compiled path.
    kit = Kit(compiled=True)
    net = NetFile()
    a, b = kit.guest(net, 0x10000), kit.guest(net, 0x18000)
    kit.put_array(b, 0x2000, [[(0x4000, 1514)]] * 2)
    assert kit.bind(b, 0x18000, 0x2000, 2, 5) == 1
    kit.put_dma(a, 0x100, [(0x1000, 60)])
    assert [kit.send(a, 0x10000, 0x100) for _ in range(2)] == [Send.DELIVERED] * 2
    assert kit.engine.fast_frames == 2


@pytest.mark.parametrize("forced", ["", "1"])
def test_lgnet_version_says_which_path(forced):
    env = dict(os.environ, PYTHONPATH=str(REPO), LGNET_PYTHON_PATH=forced)
    out = subprocess.run([sys.executable, "-m", "lgnet", "--version"], capture_output=True,
                         text=True, env=env, timeout=60).stdout
    if forced:
        assert out.strip().endswith("(per-frame path: python (forced by LGNET_PYTHON_PATH=1))")
    elif fastpath.compiled_module() is not None:
        assert out.strip().endswith("(per-frame path: compiled)")
    else:
        assert "(per-frame path: python (no compiled extension: " in out
