"""A capture can never take the lab down (issue 13, item 4): a full disk or the size cap
stops that capture, loudly, keeps a readable file of whole blocks, and the lab goes on."""
import shutil
import subprocess
import sys

import pytest

from conftest import ENV, Guests
from lgnet.fabric import capture as pcap

pytestmark = pytest.mark.timeout(120)

FRAME = bytes(range(60)) * 2


def test_the_size_cap_stops_a_capture_with_whole_blocks_and_says_so(tmp_path, capsys):
    path = str(tmp_path / "lan0.pcapng")
    net = pcap.NetCapture("lan0", path, "lan0.net", "lgnet", max_bytes=pcap.MIN_CAPTURE_BYTES)
    written = 0
    for n in range(200):
        net.pending.append(pcap.enhanced_packet(n, FRAME, len(FRAME), "frame %d" % n))
        net.flush()
        if net.stopped is None:
            written += 1
    assert net.stopped is not None and "size cap" in net.stopped
    assert 0 < written < 200
    size = (tmp_path / "lan0.pcapng").stat().st_size
    assert size <= pcap.MIN_CAPTURE_BYTES
    assert len(list(pcap.read_capture(path))) == written        # every block whole
    assert "capture of lan0 stopped" in capsys.readouterr().err
    net.close()                                                  # after a stop: nothing


def test_a_size_cap_below_the_header_blocks_is_refused():
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        pcap.capture_size("100")
    assert pcap.capture_size("8K") == 8192 and pcap.capture_size("5000") == 5000


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_capture_on_a_tiny_tmpfs_stops_and_the_lab_goes_on(tmp_path):
    # The broker runs in a mount namespace of its own whose capture directory is a 32 KiB
    # tmpfs: the chatters fill it in about a second and go on for three more.
    capture_dir = tmp_path / "capture"
    capture_dir.mkdir()
    path = str(tmp_path / "run" / "broker.sock")
    script = ("mount -t tmpfs -o size=32k lgnet-test-tmpfs {dir} || exit 3\n"
              "{py} -m lgnet broker --socket {sock} --capture {dir} &\n"
              "broker=$!\n"
              "echo broker $broker\n"
              "wait $broker\n"
              "echo broker-status $?\n"
              "{py} -m lgnet dump {dir}/lan0.pcapng | wc -l | sed 's/^/frames /'\n"
              ).format(dir=capture_dir, py=sys.executable, sock=path)
    shell = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
                             text=True)
    guests = Guests(path)
    try:
        broker_pid = int(shell.stdout.readline().split()[1])
        assert "listening on" in shell.stdout.readline()
        lan = tmp_path / "lan0.net"
        chatters = [guests.launch(lan, kernel="python:tests.guests.chatter",
                                  args=["seconds=4"]) for _ in range(2)]
        outs = [guests.finish(c) for c in chatters]
        assert [c.returncode for c in chatters] == [0, 0], outs
        for out in outs:
            counts = [int(line.split()[1]) for line in out.splitlines() if line.startswith("rx ")]
            assert counts[-1] > 300, out               # frames went on after the disk filled
        subprocess.run(["kill", "-TERM", str(broker_pid)], check=True)
        log, _ = shell.communicate(timeout=30)
    finally:
        guests.close()
        if shell.poll() is None:
            shell.kill()
            shell.communicate()
    assert "capture of lan0 stopped: No space left on device" in log, log
    assert "broker-status 0" in log, log
    frames = int(log.split("frames ", 1)[1].split()[0])
    assert frames > 10, log                            # what fitted is still readable
