"""The README's scapy test runs as written: the block that starts with `# test_echo.py` is
saved as test_echo.py and run by pytest from the repository, as the README tells a user to
(the `lab` fixture comes from the installed plugin)."""
import re
import subprocess
import sys

import pytest

from conftest import ENV, REPO, lgnet_shm
from lgnet.fabric import capture as pcap

pytestmark = pytest.mark.timeout(90)
FILE_NAME = "test_echo.py"


def readme_example(name: str = FILE_NAME) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith("# %s\n" % name)]
    assert len(found) == 1, "README.md must have one ```python block starting '# %s'" % name
    return found[0]


def test_the_readme_scapy_example_runs_as_written(tmp_path):
    code = readme_example()
    assert "lgnet.up(" in code and "lab.port(" in code and ".expect(" in code \
        and "lab.capture(" in code and "port.send(" in code
    # Run from the repository, as the README says (its scenario paths are relative to it);
    # the file itself stays in the test's own directory.
    target = tmp_path / FILE_NAME
    target.write_text(code)
    keep = tmp_path / "kept"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-s", "--lgnet-pcap", str(keep), str(target)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert re.search(r"port0 slot \d+ -> (alpha|beta) slot \d+ key lan0\+0x", result.stdout)
    # The plugin's --lgnet-pcap kept every lab's capture, per test: the `lab` fixture's and
    # the one lgnet.up() brought up.
    assert sorted(p.relative_to(keep).as_posix() for p in keep.rglob("*.pcapng")) == [
        "test_a_promiscuous_port_sees_what_others_exchange/lan0.pcapng",
        "test_alpha_answers_arp_ping_and_udp_echo/lan0.pcapng"]
    kept = pcap.read_deliveries(keep / "test_alpha_answers_arp_ping_and_udp_echo" / "lan0.pcapng")
    assert {d.receiver for d in kept} >= {"alpha", "port0"}
    assert lgnet_shm() == []


@pytest.mark.timeout(150)
def test_the_readme_impairment_example_runs_as_written(tmp_path):
    code = readme_example("test_lossy.py")
    assert "scenarios/lossy.yaml" in code and ".lgnet.fault" in code
    target = tmp_path / "test_lossy.py"
    target.write_text(code)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(target)], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=140)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
