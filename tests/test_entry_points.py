"""Each wing starts by its own entry point (python -m lgnet.fabric.broker, python -m
lgnet.guest.launcher), independent of the current directory; the user CLI keeps only the
user's options; the lab gives up on a broker that never says READY."""
import subprocess
import sys

import pytest

from conftest import ENV, REPO, lgnet_shm
from lgnet import lab as lab_module
from lgnet import process
from lgnet.errors import LgnetError

pytestmark = pytest.mark.timeout(90)


def test_a_folder_named_lgnet_in_the_current_directory_does_not_break_lgnet_up(tmp_path):
    impostor = tmp_path / "lgnet"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise SystemExit('imported the wrong lgnet')\n")
    (impostor / "__main__.py").write_text("raise SystemExit('ran the wrong lgnet')\n")
    # The user's `lgnet` command does not look in the cwd; -P is how `python` says so.
    result = subprocess.run([sys.executable, "-P", "-m", "lgnet", "up",
                             str(REPO / "scenarios/python-guests.yaml")],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrong lgnet" not in result.stdout + result.stderr
    assert result.stdout.count("powered down") == 3
    assert lgnet_shm() == []


def test_children_run_their_wing_by_its_own_entry_point_without_the_cwd():
    assert process.child_command("lgnet.fabric.broker", "--x") == [
        sys.executable, "-P", "-m", "lgnet.fabric.broker", "--x"]


@pytest.mark.parametrize("command, private", [
    ("broker", "--watch-fd"), ("broker", "--ready-fd"), ("broker", "--owns-directory"),
    ("broker", "--die-with-parent"), ("launch", "--die-with-parent")])
def test_the_user_cli_has_no_private_options(command, private):
    result = subprocess.run([sys.executable, "-m", "lgnet", command, private, "1", "python:"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_the_launcher_entry_point_reports_a_user_error_with_status_2():
    result = subprocess.run(process.child_command("lgnet.guest.launcher", "0", "python:"),
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("lgnet: memory must be a whole number of megabytes "
                                     "from 1 to 1024, got '0'")


def test_a_broker_that_never_says_ready_is_given_up_after_broker_start_seconds(
        monkeypatch, tmp_path):
    scenario = tmp_path / "one.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        "  - {name: alpha, driver: python, nets: [lan0]}\n")
    monkeypatch.setattr(lab_module, "BROKER_START_SECONDS", 0.5)
    monkeypatch.setattr(process, "child_command", lambda module, *args: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    lab = lab_module.Lab(str(scenario))
    try:
        with pytest.raises(LgnetError, match="did not start within 0.5s"):
            lab.start_broker()
        assert lab.broker.poll() is not None            # and it was stopped
    finally:
        lab.stop()
