"""--trace: the timeline of a run (lgnet.timeline, fabric/trace.py, guest/trace.py) and the
sequence chart drawn from it (lgnet.chart, `lgnet trace`).

The end-to-end tests run the three-guest scenario once with a trace and read the file as the
Perfetto UI would: a track per guest and one for the broker, every delivery of the capture a
flow from the sender's SEND_DMA slice to the receiver's interrupt slice, every Unicorn
hypercall in a function of the bundled kernel."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from elftools.elf.elffile import ELFFile

import lgnet
from lgnet import abi, chart, timeline
from lgnet.guest.images import resolve_kernel
from lgnet.guest.physmem import PhysMap
from lgnet.guest.trace import GuestTrace, Symbols

ROOT = Path(__file__).resolve().parent.parent
THREE = ROOT / "scenarios" / "three-guests.yaml"
PYTHON_GUESTS = ROOT / "scenarios" / "python-guests.yaml"
KERNEL = resolve_kernel("bundled")

# Chrome's trace-event format (the "JSON Object Format" of the Trace Event Format document),
# the parts lgnet writes: complete slices, instants, metadata and flow events.
TRACE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "traceEvents": {"type": "array", "items": {"$ref": "#/$defs/event"}},
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
    },
    "$defs": {
        "event": {
            "type": "object",
            "required": ["ph", "name", "pid", "tid"],
            "properties": {
                "ph": {"enum": ["X", "i", "M", "s", "f"]},
                "name": {"type": "string"},
                "cat": {"type": "string"},
                "pid": {"type": "integer"},
                "tid": {"type": "integer"},
                "ts": {"type": "number"},
                "dur": {"type": "number", "minimum": 0},
                "args": {"type": "object"},
                "id": {"type": ["integer", "string"]},
                "bp": {"const": "e"},
                "s": {"enum": ["g", "p", "t"]},
            },
            "allOf": [
                {"if": {"properties": {"ph": {"const": "X"}}},
                 "then": {"required": ["ts", "dur", "cat"]}},
                {"if": {"properties": {"ph": {"const": "i"}}}, "then": {"required": ["ts"]}},
                {"if": {"properties": {"ph": {"const": "M"}}},
                 "then": {"required": ["args"],
                          "properties": {"name": {"enum": ["process_name", "thread_name"]},
                                         "args": {"required": ["name"]}}}},
                {"if": {"properties": {"ph": {"enum": ["s", "f"]}}},
                 "then": {"required": ["ts", "id", "cat"]}},
            ],
        },
    },
}


def kernel_symbols() -> set[str]:
    with open(KERNEL, "rb") as image:
        return {s.name for s in ELFFile(image).get_section_by_name(".symtab").iter_symbols()
                if s.name}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """The three-guest scenario, traced: (trace, the capture's deliveries, guest pids)."""
    path = tmp_path_factory.mktemp("trace") / "three.json"
    with lgnet.up(str(THREE), trace=str(path)) as lab:
        assert lab.wait(60), "the three guests did not power down"
    pids = {run.name: run.process.pid for run in lab.guests}
    return timeline.load(str(path)), lab.deliveries("lan0"), pids, path


def events(trace, **match):
    return [e for e in trace["traceEvents"] if all(e.get(k) == v for k, v in match.items())]


def test_the_trace_is_chromes_trace_event_format(three):
    trace = three[0]
    jsonschema.validate(trace, TRACE_EVENT_SCHEMA)
    json.dumps(trace)


def test_a_track_per_guest_and_for_the_broker(three):
    trace, _deliveries, pids, _path = three
    names = {e["pid"]: e["args"]["name"] for e in events(trace, ph="M", name="process_name")}
    for guest, pid in pids.items():
        assert names[pid] == guest
    assert "broker (the Host)" in names.values()
    broker = next(pid for pid, name in names.items() if name == "broker (the Host)")
    assert events(trace, pid=broker, cat=timeline.CAT_LOCK)
    assert events(trace, pid=broker, cat=timeline.CAT_TRANSFER)
    for pid in pids.values():
        assert events(trace, pid=pid, name="HALT")
        lines = [e["args"]["line"] for e in events(trace, pid=pid, cat=timeline.CAT_CONSOLE)]
        assert any("ping statistics" in line for line in lines)


def test_every_delivery_has_its_flow_from_send_dma_to_the_receivers_interrupt(three):
    trace, deliveries, pids, _path = three
    assert deliveries
    transfers = {(e["args"]["send"], e["args"]["receiver"]): e
                 for e in events(trace, cat=timeline.CAT_TRANSFER)}
    starts = {e["id"]: e for e in events(trace, ph="s")}
    ends = {e["id"]: e for e in events(trace, ph="f")}
    for d in deliveries:
        transfer = transfers[d.send, d.receiver]
        assert transfer["args"]["key"] == "lan0+%#x" % d.key_offset
        assert transfer["args"]["summary"]
        flow = timeline.flow_id(d.send, d.receiver_guest)
        start, end = starts[flow], ends[flow]
        assert start["name"] == end["name"] == "send %d" % d.send
        assert start["pid"] == pids[d.sender] and end["pid"] == pids[d.receiver]
        sends = [e for e in events(trace, pid=start["pid"], name="SEND_DMA")
                 if e["ts"] < start["ts"] < e["ts"] + e["dur"]
                 and e["args"]["key"] == transfer["args"]["key"]]
        assert sends
        assert start["ts"] <= end["ts"]
        interrupt = [e for e in events(trace, pid=end["pid"], cat=timeline.CAT_INTERRUPT)
                     if e["ts"] < end["ts"] < e["ts"] + e["dur"]]
        assert interrupt and interrupt[0]["args"]["irq"] == transfer["args"]["irq"]


def test_each_unicorn_hypercall_names_a_function_of_the_bundled_kernel(three):
    trace, _deliveries, pids, _path = three
    symbols = kernel_symbols()
    for pid in pids.values():
        calls = events(trace, pid=pid, cat=timeline.CAT_HYPERCALL)
        assert calls
        for call in calls:
            if "ring" in call["args"]:
                # Queued in the async ring: the Host made it with the next call, named here.
                assert call["args"]["ring"].startswith("queued, made with "), call
                assert "function" not in call["args"]
                continue
            assert call["args"]["function"].split("+")[0] in symbols, call
        # net_xmit queues its frames in the ring (and sends at once only when it is full).
        sent = [c["args"] for c in calls
                if c["name"] == "SEND_DMA" and c["args"]["key"].startswith("lan0+")]
        assert sent and all("ring" in a or a["function"] == "net_xmit" for a in sent)
        assert any("ring" in a for a in sent)
        for irq in events(trace, pid=pid, cat=timeline.CAT_INTERRUPT):
            assert irq["args"]["eip"] and irq["args"]["handler_eip"]
        crash = events(trace, pid=pid, name="CRASH")
        assert crash and crash[0]["args"]["stopped"] == "CRASH: Power down"


def test_the_chart_has_a_lane_per_guest_and_an_arrow_per_delivery(three, tmp_path):
    _trace, deliveries, pids, path = three
    out = tmp_path / "chart.svg"
    done = subprocess.run([sys.executable, "-m", "lgnet", "trace", str(path), "--chart",
                           str(out), "-n", "5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "5 of %d deliveries, 3 lanes" % len(deliveries) in done.stdout
    svg = ET.parse(out).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    groups = svg.findall("{http://www.w3.org/2000/svg}g")
    lanes = [g.get("data-guest") for g in groups if g.get("class") == "lane"]
    assert lanes == list(pids)                       # the scenario's order
    arrows = [g for g in groups if g.get("class") == "delivery"]
    assert [int(g.get("data-send")) for g in arrows] == [d.send for d in deliveries[:5]]


def test_lgnet_trace_lists_the_deliveries(three):
    _trace, deliveries, _pids, path = three
    done = subprocess.run([sys.executable, "-m", "lgnet", "trace", str(path), "-n", "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    first = deliveries[0]
    assert "%s -> %s" % (first.sender, first.receiver) in lines[0]
    assert "send %d" % first.send in lines[0]


def test_python_guests_trace_their_hypercalls_and_handlers(tmp_path):
    path = tmp_path / "py.json"
    with lgnet.up(str(PYTHON_GUESTS), trace=str(path)) as lab:
        lab.wait(30)
        deliveries = [d for net in lab.scenario.networks for d in lab.deliveries(net)]
    trace = timeline.load(str(path))
    jsonschema.validate(trace, TRACE_EVENT_SCHEMA)
    assert deliveries
    flows = {e["id"] for e in events(trace, ph="f")}
    joined = [d for d in deliveries if timeline.flow_id(d.send, d.receiver_guest) in flows]
    assert joined, "no delivery of the Python guests was joined to an interrupt"
    assert not [e for e in events(trace, cat=timeline.CAT_HYPERCALL) if "eip" in e["args"]]


# --- the pieces, in one process ---------------------------------------------------------------

def slice_(pid, cat, name, ts, dur, **args):
    return {"ph": "X", "pid": pid, "tid": 1, "cat": cat, "name": name, "ts": ts, "dur": dur,
            "args": args}


def transfer(ts, send, sender_pid, receiver_pid, receiver_guest, irq=1, key="lan0+0x4"):
    return slice_(9, timeline.CAT_TRANSFER, "transfer", ts, 2, send=send,
                  sender_pid=sender_pid, receiver_pid=receiver_pid, key=key,
                  receiver_guest=receiver_guest, receiver="g%d" % receiver_guest, irq=irq)


def test_the_join_takes_the_enclosing_send_of_that_key_and_the_next_interrupt_of_that_line():
    evs = [slice_(1, timeline.CAT_HYPERCALL, "SEND_DMA", 100, 50, key="lan0+0x4"),
           slice_(1, timeline.CAT_HYPERCALL, "SEND_DMA", 200, 50, key="lan0+0x4"),
           # two sends from the async ring: one span, told apart by their keys
           slice_(1, timeline.CAT_HYPERCALL, "SEND_DMA", 300, 50, key="lan0+0x8"),
           slice_(1, timeline.CAT_HYPERCALL, "SEND_DMA", 300, 50, key="lan0+0xc"),
           transfer(110, 1, 1, 2, 0), transfer(120, 1, 1, 3, 1),     # a broadcast: two flows
           transfer(210, 2, 1, 2, 0, irq=2),
           transfer(310, 3, 1, 2, 0, key="lan0+0x10"),               # no send of that key
           transfer(320, 4, 1, 2, 0, key="lan0+0xc"),
           slice_(2, timeline.CAT_INTERRUPT, "interrupt 2", 130, 1, irq=2),   # another line
           slice_(2, timeline.CAT_INTERRUPT, "interrupt 1", 140, 1, irq=1),
           slice_(2, timeline.CAT_INTERRUPT, "interrupt 1", 330, 1, irq=1),
           slice_(3, timeline.CAT_INTERRUPT, "interrupt 1", 100, 1, irq=1)]  # before: not it
    flows = timeline.frame_flows(evs)
    ends = {f["id"]: f for f in flows if f["ph"] == "f"}
    assert ends[timeline.flow_id(1, 0)]["ts"] == 140.5 and ends[timeline.flow_id(1, 0)]["pid"] == 2
    # g1 never took interrupt 1 after the send, nor g0 interrupt 2 after send 2; send 3 has
    # no SEND_DMA of its key around it: no flow.
    assert set(ends) == {timeline.flow_id(1, 0), timeline.flow_id(4, 0)}
    start = next(f for f in flows if f["ph"] == "s")
    assert start["pid"] == 1 and start["ts"] == 112           # the transfer's end, inside
    assert evs[4]["args"]["flow"] == timeline.flow_id(1, 0) and "flow" not in evs[5]["args"]


def test_a_stream_buffers_until_flushed_and_a_torn_last_line_is_dropped(tmp_path):
    path = str(tmp_path / "s.jsonl")
    stream = timeline.EventStream(path, "p")
    stream.instant(1, "c", "one", timeline.now_us())
    stream.flush(force=False)
    assert Path(path).read_text() == ""              # below FLUSH_EVENTS: still buffered
    stream.close()
    with open(path, "a") as f:
        f.write('{"ph": "X", "na')                  # a process killed mid-line
    assert [e["name"] for e in timeline.read_stream(path)] == ["process_name", "one"]


def test_symbols_name_c_functions_and_assembly_labels():
    symbols = Symbols(KERNEL)
    names = kernel_symbols()
    with open(KERNEL, "rb") as image:
        xmit = next(s for s in ELFFile(image).get_section_by_name(".symtab").iter_symbols()
                    if s.name == "net_xmit")
    assert symbols.function(xmit["st_value"] + 3) == "net_xmit"
    assert symbols.function(0) is None
    assert Symbols("/nonexistent").function(xmit["st_value"]) is None
    assert "lguest_entry" in names


def test_keys_and_dma_lists_are_decoded_as_the_capture_writes_them():
    ram = bytearray(abi.PAGE_SIZE * 2)
    phys = PhysMap()
    phys.add(0, ram)
    phys.write(0x100, abi.pack_dma([(0x200, 60), (0x400, 4)]))
    trace = GuestTrace("/dev/null", "t", phys, [(0x1000_0000, 0x1000_1000, "lan0")])
    args = trace.arguments(abi.LHCALL_SEND_DMA, 0x1000_0004, 0x100, 0)
    assert args == {"key": "lan0+0x4", "dma": "0x100", "pieces": "0x200:60 0x400:4"}
    assert trace.arguments(abi.LHCALL_SEND_DMA, 0, 0x5000_0000, 0)["pieces"].startswith(
        "Invalid address")
    bind = trace.arguments(abi.LHCALL_BIND_DMA, 0x1000_0008, 0x100, abi.bind_dma_arg(8, 1))
    assert bind == {"key": "lan0+0x8", "dmas": "0x100", "num": 8, "irq": 1}
    assert trace.key_name(abi.LGUEST_CONSOLE_DMA_KEY) == "console"
    trace.close()


def test_a_missing_or_foreign_trace_is_the_users_mistake(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    for target in (tmp_path / "missing.json", bad):
        done = subprocess.run([sys.executable, "-m", "lgnet", "trace", str(target)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "trace" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["up", str(THREE)], ["test", str(ROOT / "scenarios" /
                                                                     "ping-expect.yaml")],
                                     ["launch", "16", "python:"]])
@pytest.mark.parametrize("where, said", [("no/t.json", "no directory"), (".", "is a directory")])
def test_a_trace_that_cannot_be_written_is_refused_before_anything_starts(
        tmp_path, command, where, said):
    args = command[:1] + ["--trace", str(tmp_path / where)] + command[1:]
    done = subprocess.run([sys.executable, "-m", "lgnet", *args], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.trace.jsonl")) and not list(tmp_path.glob(".*.jsonl"))


def test_lgnet_launch_traces_its_one_guest(guests, tmp_path):
    """Two launchers by hand: the one with --trace writes its own track (no broker's: it is
    not the launcher's), its SEND_DMAs to the net decoded, its handlers timed."""
    lan, out = tmp_path / "lan0.net", tmp_path / "one.json"
    script = "script=await:0:1:10,peers:0,wait:1"
    traced = guests.launch(lan, args=[script], options=("--trace", str(out)))
    other = guests.launch(lan, args=[script])
    guests.finish(other)
    guests.finish(traced)
    assert traced.returncode == 0
    trace = timeline.load(str(out))
    jsonschema.validate(trace, TRACE_EVENT_SCHEMA)
    assert {e["pid"] for e in trace["traceEvents"]} == {traced.pid}
    sends = [e for e in events(trace, name="SEND_DMA") if e["args"]["key"].startswith("lan0+")]
    assert sends and all(e["args"]["pieces"] != "(empty)" for e in sends)
    assert events(trace, cat=timeline.CAT_INTERRUPT)
    assert not list(tmp_path.glob(".one.json*"))      # the stream is gone once merged
