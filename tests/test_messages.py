"""The messages that used to be missing or wrong: a second broker on a socket in use, near
misses in a scenario, a `kernel:` that is no kernel, and `lgnet bench --plot` that cannot
plot — each said once, at once, with exit status 2."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENV, REPO

pytestmark = pytest.mark.timeout(60)


def run_lgnet(*args, timeout=30, cwd=REPO):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lgnet", *map(str, args)], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def test_a_second_broker_on_the_same_socket_says_only_that_it_is_in_use(tmp_path):
    path = tmp_path / "run" / "broker.sock"
    first = subprocess.Popen([sys.executable, "-m", "lgnet", "broker", "--socket", str(path)],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("lgnet broker listening on %s" % path)
        second, _ = run_lgnet("broker", "--socket", path)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=10)
    assert second.returncode == 2
    assert second.stdout == ""                     # no "listening on" before the refusal
    assert second.stderr.strip() == "lgnet: broker: a broker is already listening on %s" % path


@pytest.mark.parametrize("guest, message", [
    ("{name: a, kernel: bundle}", "guests[0].kernel: no such file: {dir}/bundle "
                                  "(did you mean 'bundled'?)"),
    ("{name: a, kernal: bundled}", "guests[0].kernal: unknown key (did you mean 'kernel'?) "
                                   "(allowed: name, mem, kernel, driver, nets, promisc, ip, "
                                   "cmdline, args, block, initrd, script, gdb)"),
    ("{name: a, driver: pyhton}", "guests[0].driver: must be one of 'python', got 'pyhton' "
                                  "(did you mean 'python'?)"),
    ("{name: a, kernel: notes.txt}", "guests[0].kernel: {dir}/notes.txt is not an lguest "
                                     "kernel (an i386 vmlinux or a bzImage): it is text "
                                     "('These are my notes about...') (Could not find kernel in "
                                     "bzImage)"),
])
def test_lgnet_up_refuses_a_near_miss_or_a_non_kernel_before_anything_runs(tmp_path, guest,
                                                                           message):
    (tmp_path / "notes.txt").write_text("These are my notes about lguest, not a kernel.\n" * 3)
    scenario = tmp_path / "x.yaml"
    scenario.write_text("guests:\n  - %s\n" % guest)
    result, took = run_lgnet("up", scenario)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""                     # no lab was brought up
    assert result.stderr.strip() == "lgnet: %s:2: %s" % (scenario,
                                                         message.format(dir=tmp_path))


def test_bench_plot_without_matplotlib_is_refused_before_the_run():
    code = ("import sys; sys.modules['matplotlib'] = None\n"     # as if it were not installed
            "from lgnet.cli import main; sys.exit(main(['bench', '--quick', '--plot', "
            "'out.png']))")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""                     # not even "lgnet bench: 1 round(s)"
    assert result.stderr.strip() == ("lgnet: --plot out.png: matplotlib is not installed "
                                     "(pip install 'lgnet[bench]')")
    assert time.monotonic() - started < 20         # a quick bench alone takes longer
    assert not os.path.exists(REPO / "out.png")


def test_bench_plot_into_a_missing_directory_is_refused_before_the_run(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "plot.png"
    result, _ = run_lgnet("bench", "--quick", "--plot", target)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "lgnet: --plot %s: %s is not a directory we may write " \
                                    "into" % (target, target.parent)
