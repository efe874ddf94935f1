"""`lgnet bench`: every workload and anchor lands in the JSON with positive figures and the
ratios computed from them (no assertion on speed), and receivers count only intact frames."""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lgnet import abi, anchors
from lgnet.errors import LgnetError
from lgnet.bench import BenchOptions, Plan, Report, Workload, make_plan, run
from lgnet.bench.run import parse_flood_summary, run_fanout, run_stream
from lgnet.guest.benchguests import (END_SEQ, MIN_FRAME, NOT_VERIFIED, frame_template,
                                     prefix_crc, stamp, verify)

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))
BALLAST_MB = 400                     # a bench script grown big before it starts a guest


def lgnet_leftovers() -> list[str]:
    shm = [name for name in os.listdir("/dev/shm") if "lgnet" in name]
    netns = os.listdir(anchors.NETNS_DIR) if os.path.isdir(anchors.NETNS_DIR) else []
    return shm + [name for name in netns if name.startswith("lgb")]


def make_frame(size: int, seq: int) -> bytearray:
    frame = frame_template(abi.BROADCAST_MAC, abi.guest_mac(1), size, random.Random(size))
    stamp(frame, 0, size, seq, prefix_crc(frame))
    return frame


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [MIN_FRAME, 60, 1514, 65536])
def test_verify_accepts_an_intact_frame_and_rejects_any_damage(size):
    frame = make_frame(size, 12345)
    assert verify(frame) == 12345
    rng = random.Random(size)
    for at in {0, 6, 12, 14, 17, 18, size // 2, size - 5, size - 1} | {
            rng.randrange(size) for _ in range(20)}:
        bad = bytearray(frame)
        bad[at] ^= 1 << rng.randrange(8)
        assert verify(bad) == NOT_VERIFIED, at
    assert verify(frame[:-1]) == NOT_VERIFIED                  # truncated
    assert verify(frame + b"\0") == NOT_VERIFIED               # padded
    assert verify(frame[:MIN_FRAME - 1]) == NOT_VERIFIED


@pytest.mark.timeout(10)
def test_stamp_changes_only_seq_and_crc_and_end_is_a_valid_frame():
    frame = make_frame(100, 1)
    again = bytearray(frame)
    stamp(again, 0, 100, END_SEQ, prefix_crc(frame))
    assert verify(again) == END_SEQ
    changed = [i for i in range(100) if frame[i] != again[i]]
    assert all(14 <= i < 18 or i >= 96 for i in changed)


@pytest.mark.timeout(60)
def test_a_stream_counts_as_verified_exactly_what_the_fabric_delivered():
    w = Workload("stream-deep-1514", "stream", "stream", 1514, rx=64, rxsize=1514)
    fig = run_stream(w, 0.3)
    assert fig["verified"] > 0 and fig["corrupt"] == 0
    # Every buffer the receiver took held an intact frame (the END frame is the one extra),
    # every send that came back with used_len == size was taken, and the broker agrees.
    assert fig["taken"] == fig["verified"] + 1
    assert fig["delivered"] == fig["verified"]
    assert fig["delivered"] + fig["lost"] + fig["short"] == fig["sent"]
    assert lgnet_leftovers() == []


@pytest.mark.timeout(60)
def test_a_fanout_reaches_every_receiver_intact():
    w = Workload("fanout-4", "fanout", "fan-out", 1514, guests=4)
    fig = run_fanout(w, 0.3)
    assert fig["verified"] == fig["delivered"] > 0 and fig["corrupt"] == 0
    assert fig["bringup_s"] > 0 and fig["rss_mb_max"] > 0


@pytest.mark.timeout(60)
def test_a_guests_peak_rss_is_its_own_not_that_of_the_process_that_started_it():
    # Linux carries ru_maxrss over exec: a launcher Popen'd by a big bench script reported
    # the script's peak as its own. Make this process big, then start one and ask it.
    ballast = bytearray(BALLAST_MB * abi.MiB)
    ballast[::abi.PAGE_SIZE] = b"\1" * len(ballast[::abi.PAGE_SIZE])
    child = subprocess.run([sys.executable, "-c", "from lgnet.guest.benchguests import "
                            "peak_rss_kb; print(peak_rss_kb())"], env=ENV, check=True,
                           capture_output=True, text=True, timeout=30)
    del ballast
    assert 0 < int(child.stdout) < BALLAST_MB * 1024 / 2


@pytest.mark.timeout(60)
def test_the_run_api_hands_a_script_a_structured_report_and_prints_nothing(capfd):
    opts = BenchOptions(sizes=(1514,), seconds=0.3, rounds=1)
    plan = Plan(opts, (Workload("stream-deep-1514", "stream", "stream", 1514, rx=64, rxsize=1514),
                       Workload("latency-60", "latency", "latency", 60)), unicorn_scale=())
    steps = []
    report = run(plan, progress=steps.append)
    assert isinstance(report, Report)
    assert capfd.readouterr().out == ""                   # the face prints; the API does not
    assert steps[0] == "round 1/1: stream, 1514 B" and len(steps) == 3
    stream = report.row("stream-deep-1514")
    assert stream["lgnet"]["verified"] > 0 and stream["lgnet"]["corrupt"] == 0
    assert stream["ratios"]["socketpair"] == pytest.approx(
        stream["lgnet"]["frames_s"] / stream["anchors"]["socketpair"]["frames_s"])
    latency = report.row("latency-60")
    assert latency["lgnet"]["p50_us"] > 0
    # The figures the tables set beside a metric are the Report's, not the face's.
    assert latency["lgnet"]["rtt_p50_us"] == 2 * latency["lgnet"]["p50_us"]
    assert latency["ratios"]["socketpair_p99"] == pytest.approx(
        latency["lgnet"]["p99_us"] / latency["anchors"]["socketpair"]["p99_us"])
    assert report.row("fanout-2") is None and report.unicorn_scale["tried"] == []
    assert report.recording is None                       # no capture or trace rows planned
    document = json.loads(json.dumps(report.to_dict()))
    assert [r["workload"] for r in document["rows"]] == ["stream-deep-1514", "latency-60"]
    assert document["options"]["sizes"] == [1514] and document["targets"]
    assert lgnet_leftovers() == []


@pytest.mark.timeout(10)
def test_a_plan_is_made_from_the_options_alone():
    quick = make_plan(quick=True)
    keys = [w.key for w in quick.workloads]
    assert keys[:2] == ["stream-lguest_net-60", "stream-lguest_net-1514"]
    assert "fanout-8" in keys and "fanout-32" not in keys and keys[-1] == "unicorn-icmp"
    assert quick.options.rounds == 1 and quick.unicorn_scale == (4,)
    full = make_plan(sizes=[100], guests=128)
    assert [w.key for w in full.workloads if w.kind == "fanout"] == [
        "fanout-2", "fanout-8", "fanout-32", "fanout-128"]
    assert {"stream-deep-100-capture", "stream-deep-100-trace"} <= {w.key for w in full.workloads}
    # The netns anchor is the run's finding, not the plan's.
    assert "netns" not in full.workloads[0].anchors(netns=False)
    with pytest.raises(LgnetError, match="--sizes: 70000"):
        make_plan(sizes=[70000])


@pytest.mark.timeout(10)
def test_the_bundled_kernels_flood_summary_is_parsed_from_its_one_line():
    # main.c: printk("flood " IP_FMT ": %u sent, %u received, %u replies/s, rtt avg %s ms\n")
    console = ["lguest: ready", "flood 10.0.0.2: 812 sent, 811 received, 811 replies/s, "
               "rtt avg 1.234 ms", "lguest: power off"]
    assert parse_flood_summary(console) == {"target": "10.0.0.2", "sent": 812,
                                            "received": 811, "replies_s": 811, "rtt_ms": 1.234}
    assert parse_flood_summary(console[:1]) is None            # not printed yet
    assert parse_flood_summary(["flood 10.0.0.2: 812 sent"]) is None


@pytest.mark.timeout(120)
def test_lgnet_bench_quick_writes_every_workload_and_anchor(tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "bench.png"
    tag = "lgnet-bench-test-%d" % os.getpid()
    # --plot without matplotlib is refused before the run (tests/test_messages.py).
    plots = importlib.util.find_spec("matplotlib") is not None
    done = subprocess.run([sys.executable, "-m", "lgnet", "bench", "--quick", "--json", str(out)]
                          + (["--plot", str(png)] if plots else []), cwd=tmp_path,
                          env=dict(ENV, LGNET_TEST_TAG=tag), capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "lgnet/sp" in done.stdout and "Targets" in done.stdout
    assert png.exists() == plots
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["python"]
    assert result["method"]["verification"]
    rows = {r["workload"]: r for r in result["rows"]}
    assert {"stream-lguest_net-60", "stream-lguest_net-1514", "stream-deep-60",
            "stream-deep-1514", "stream-deep-65536", "latency-60", "fanout-2",
            "fanout-8", "unicorn-icmp", "stream-deep-1514-capture",
            "stream-deep-1514-trace"} <= set(rows)
    assert "Recording costs per frame" in done.stdout and "--trace on" in done.stdout
    for row in rows.values():
        fig = row["metric"]
        lg = row["lgnet"]
        assert lg[fig] > 0, row["workload"]
        assert lg.get("corrupt", 0) == 0
        expected = {"socketpair", "netns"} | (
            {"copy"} if row["kind"] not in ("latency", "unicorn") else set())
        assert expected <= set(row["anchors"]), row["workload"]
        for name, anchor in row["anchors"].items():
            if "skipped" in anchor:
                assert name == "netns" and anchor["skipped"]
                continue
            assert anchor[fig] > 0, (row["workload"], name)
            assert row["ratios"][name] == pytest.approx(lg[fig] / anchor[fig])
        if row["kind"] == "stream":
            assert lg["mb_s"] == pytest.approx(lg["frames_s"] * row["size"] / 1e6)
            for part in ("broker_engine_us", "copy_us", "sender_cpu_us", "receiver_cpu_us"):
                assert lg[part] > 0, part
    # The Unicorn pair: round trips per second and mean RTT, parsed from the bundled kernel's
    # flood summary; and how many Unicorn guests fit (no assertion on speed).
    uni = rows["unicorn-icmp"]["lgnet"]
    assert uni["replies_s"] > 0 and uni["rtt_us"] > 0
    assert 0 < uni["received"] <= uni["sent"]
    assert "round trips/s" in done.stdout and "Unicorn guests" in done.stdout
    scale = result["unicorn_scale"]
    assert scale["tried"] and all(t["rss_mb_mean"] > 0 for t in scale["tried"])
    assert scale["fits"] > 0
    assert {t["target"] for t in result["targets"]}
    assert lgnet_leftovers() == []
    assert tagged_processes(tag) == []          # nothing of the run is left running


def tagged_processes(tag: str) -> list[int]:
    """Processes whose environment carries our tag: children of the run, wherever they went."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/environ" % pid, "rb") as env:
                if ("LGNET_TEST_TAG=" + tag).encode() in env.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.timeout(10)
def test_the_targets_are_judged_from_the_rows_of_the_same_run():
    """Issue 15's table: ratios of one run, each against the anchor the target names."""
    from lgnet.bench.run import targets

    def row(workload, ratios, **lgnet):
        return {"workload": workload, "ratios": ratios, "lgnet": lgnet}

    rows = [row("stream-deep-1514", {"socketpair": 1.2, "netns": 0.9}, frames_s=100.0),
            row("stream-deep-1514-capture", {}, frames_s=79.0),
            row("latency-60", {"socketpair": 1.5}),
            row("fanout-2", {}, deliveries_s=10.0), row("fanout-32", {}, deliveries_s=9.0),
            row("unicorn-icmp", {"socketpair": 0.51})]
    judged = {t["target"]: t for t in targets(rows)}
    assert judged["stream 1514 B frames/s >= 1.0x socketpair (deep rx)"]["met"] is True
    assert judged["stream 1514 B frames/s >= 1.0x netns (deep rx)"]["met"] is False
    capture = judged["capture on >= 0.8x capture off (1514 B deep rx)"]
    assert capture["measured"] == pytest.approx(0.79) and capture["met"] is False
    assert judged["latency p50 <= 1.5x socketpair"]["met"] is True
    assert judged["fan-out deliveries/s at 32 >= 0.9x at 2"]["met"] is True
    assert judged["unicorn ICMP round trips >= 0.5x socketpair ping-pong"]["met"] is True
    assert judged["128 guests up < 5 s"]["met"] is None           # no scale run: not run
    assert judged["stream 65,536 B MB/s >= 1.5x socketpair"]["measured"] is None
