"""A user's mistake is a message and exit status 2, never a traceback (issue 13, item 6)."""
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ENV

pytestmark = pytest.mark.timeout(60)


def launch(broker, *args):
    return subprocess.run([sys.executable, "-m", "lgnet", "launch", "--broker", broker,
                           "--no-console-input", *args], env=ENV, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("kernel, says", [
    ("python:nosuchmodule", "python:nosuchmodule: no module named 'nosuchmodule'"),
    ("python:lgnet.nosuch", "no module named 'lgnet.nosuch'"),
    ("python:os", "python:os: module os has no main(machine)"),
])
def test_a_python_kernel_that_is_not_one_is_exit_2(broker, kernel, says):
    run = launch(broker, "1", kernel)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run


def test_a_script_step_on_a_net_the_guest_does_not_have_is_exit_2(broker, tmp_path):
    run = launch(broker, "--sharenet", str(tmp_path / "lan0.net"), "1", "python:",
                 "script=await:9:1")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run
    assert "step 'await:9:1:10' names net device eth9, but this guest has 1" in run.stderr


def test_a_broker_of_another_user_is_named_not_gone():
    # Another user's listening socket (a forked child of ours turned nobody: a broker would
    # close on us at once, as it serves its own uid only), where nobody may create it.
    shared = tempfile.mkdtemp(prefix="lgnet-test-")
    os.chmod(shared, 0o777)
    path = os.path.join(shared, "other.sock")
    nobody = 65534
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(path)
            listener.listen(4)
            os.write(ready_w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        run = launch(path, "1", "python:")
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        shutil.rmtree(shared)
    assert run.returncode == 2, run
    assert "the broker at %s runs as uid %d" % (path, nobody) in run.stderr, run
    assert "went away" not in run.stdout + run.stderr


def test_lgnet_broker_never_changes_the_mode_of_a_directory_it_did_not_create(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    made = tmp_path / "made" / "deeper"
    procs = [subprocess.Popen([sys.executable, "-m", "lgnet", "broker", "--socket",
                               str(directory / "x.sock")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=ENV)
             for directory in (existing, made)]
    try:
        for proc in procs:
            assert b"listening on" in proc.stdout.readline()
    finally:
        for proc in procs:
            proc.terminate()
            proc.communicate(timeout=10)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    assert stat.S_IMODE(made.stat().st_mode) == 0o700        # its own: private


def lgnet(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lgnet", *args], env=ENV, capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("text", ["a: " + "[" * 5000 + "]" * 5000,
                                  "a: " + "{b: " * 3000 + "1" + "}" * 3000],
                         ids=["sequences", "mappings"])
def test_deeply_nested_yaml_is_exit_2_not_a_recursion_error(tmp_path, text):
    scenario = tmp_path / "deep.yaml"
    scenario.write_text(text)
    run = lgnet("up", str(scenario))
    assert run.returncode == 2 and "RecursionError" not in run.stderr, run
    assert "nests deeper than Python can follow" in run.stderr


def test_a_nul_in_a_scenario_cmdline_is_exit_2(tmp_path):
    scenario = tmp_path / "nul.yaml"
    scenario.write_text('networks:\n  lan0: {}\nguests:\n'
                        '  - {name: a, driver: python, nets: [lan0], cmdline: "x\\0y"}\n')
    run = lgnet("up", str(scenario))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run
    assert "nul.yaml:4: guests[0].cmdline: must not contain NUL" in run.stderr


@pytest.mark.parametrize("kernel", ["python:", "bundled"])
def test_a_command_line_longer_than_its_page_is_exit_2(broker, kernel):
    run = launch(broker, "1", kernel, *["x" * 100000] * 3)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run
    assert "the kernel command line is 300002 bytes; it has one page" in run.stderr


def test_a_scenario_whose_file_turns_out_bad_at_launch_is_exit_2(tmp_path):
    # It exists (the scenario reads well) but is no block device: only the launcher finds out.
    scenario = tmp_path / "bad-block.yaml"
    scenario.write_text("networks:\n  lan0: {}\nguests:\n"
                        "  - {name: a, driver: python, nets: [lan0], block: /proc/version}\n")
    run = lgnet("up", str(scenario), "--duration", "5")
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr, run
    assert "block file '/proc/version': cannot find its size" in run.stdout
    assert "a refused at launch" in run.stderr
