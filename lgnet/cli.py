"""`lgnet`: the command line, a face over lab.py and the two wings.

Rules of this file: parsing and printing only. Whatever a Python user of lgnet would need
lives in lab.py, fabric/ or guest/; user errors (LgnetError) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import lgnet
from lgnet import abi, wire
from lgnet.errors import LgnetError
from lgnet.process import EXIT_INTERRUPTED, entry_main


def cmd_broker(args) -> int:
    from lgnet.fabric import fastpath
    from lgnet.fabric.broker import check_first_guest_id, parse_net_name, run_broker
    path = args.socket or wire.default_socket_path()
    nets = dict(parse_net_name(text) for text in args.net)

    def say_listening() -> None:
        if not args.quiet:
            print("lgnet broker listening on %s (export LGNET_BROKER=%s; per-frame path: %s)"
                  % (path, path, fastpath.label()), flush=True)
    run_broker(path, capture_dir=args.capture, net_names=nets, on_listening=say_listening,
               first_guest_id=check_first_guest_id(args.first_guest_id),
               seed=args.seed, capture_max=args.capture_max)
    return 0


def cmd_launch(args) -> int:
    from lgnet.guest.launcher import config_from, launch_main
    return launch_main(config_from(args))


TRACE_WRITTEN = "trace: %s (open it in https://ui.perfetto.dev or chrome://tracing)"
TRACE_HELP = ("write the run's timeline to FILE (Chrome JSON trace events: every hypercall, "
              "transfer and interrupt, a flow arrow per frame)")


def cmd_trace(args) -> int:
    from lgnet import chart
    trace = chart.load_trace(args.file)
    if args.chart is not None:
        shown = chart.write_chart(trace, args.chart, args.frames)
        print("wrote %s: %d of %d deliveries, %d lanes" % (
            args.chart, shown, len(chart.deliveries(trace)), len(chart.lanes(trace))))
        return 0
    for n, d in enumerate(chart.deliveries(trace)[:args.frames], 1):
        print("%5d %10.3f ms  %s" % (n, d.offset_ms, d.line()))
    return 0


def sigterm_interrupts() -> None:
    """SIGTERM ends a run like Ctrl-C: torn down, the table still printed."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


COLUMNS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_carrier_errors",
           "rx_dropped")
HEADINGS = ("guest", "tx pkts", "tx bytes", "rx pkts", "rx bytes", "carrier err", "drops",
            "ended")
# What impairments did, shown when they did anything.
IMPAIR_COLUMNS = ("tx_lost", "rx_late", "rx_duplicates", "rx_corrupted")
IMPAIR_HEADINGS = ("lost", "late", "dups", "corrupt")


# Why a guest's own "tx N packets" may be another number: it counts frames it sent, the broker
# counts deliveries (README, "What the results table counts").
TABLE_NOTE = ("(the broker's counts, per delivery: a broadcast that reaches N guests is N tx "
              "pkts; a guest's own count is per frame sent)")


def results_table(guests) -> str:
    """One row per guest: the broker's counters and how it ended."""
    columns, headings = COLUMNS, HEADINGS
    if any(g.stats.get(c) for g in guests for c in IMPAIR_COLUMNS):
        columns = COLUMNS + IMPAIR_COLUMNS
        headings = HEADINGS[:-1] + IMPAIR_HEADINGS + HEADINGS[-1:]
    rows = [headings] + [(g.name,) + tuple(str(g.stats.get(c, 0)) for c in columns)
                         + (g.ending,) for g in guests]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headings) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])]
        lines.append("  ".join(cells + [row[-1]]))
    return "\n".join(lines)


def cmd_up(args) -> int:
    """0 when no guest was killed, 1 when one was, 130 when interrupted."""
    from lgnet.lab import run_up
    sigterm_interrupts()

    def whereabouts(lab) -> None:
        with lab.out_lock:
            print("".join("lgnet up: %s\n" % line for line in lab.whereabouts()), end="",
                  flush=True)
    if args.pcap_max is not None and args.pcap is None:
        raise LgnetError("--pcap-max caps the capture of --pcap DIR: give --pcap DIR too")
    result = run_up(args.scenario, duration=args.duration, out=sys.stdout, pcap=args.pcap,
                    uplink=args.uplink, trace=args.trace,
                    on_up=whereabouts, seed=args.seed, pcap_max=args.pcap_max)
    print("\n" + results_table(result.guests + [u.run for u in result.uplinks]) + "\n"
          + TABLE_NOTE)
    for link in result.uplinks:
        print(link.describe())
    if args.pcap is not None:
        print("capture: %s" % " ".join(result.captures))
    if args.trace is not None:
        print(TRACE_WRITTEN % args.trace)
    status = EXIT_INTERRUPTED if result.interrupted else 1 if result.killed else 0
    if args.json:
        write_json(args.json, result.as_dict(status))
    if result.refused and not result.interrupted:
        # The scenario read well but a file of it turned out bad at launch: still the
        # user's mistake (exit 2), whose message the guest's lines above carry.
        raise LgnetError("%s refused at launch (see %s lines above)" % (
            ", ".join(g.name for g in result.refused),
            "its" if len(result.refused) == 1 else "their"))
    return status


def write_json(path: str, record: dict) -> None:
    import json
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def cmd_shell(args) -> int:
    from lgnet.shell import run_shell
    return run_shell(args.scenario, pcap=args.pcap)


def cmd_test(args) -> int:
    """0 when every expectation held, 1 when one did not (with what was seen)."""
    from lgnet.lab import run_test
    sigterm_interrupts()
    result = run_test(args.scenario, out=sys.stdout, pcap=args.pcap, trace=args.trace)
    verdicts = result.verdicts
    print("\n" + "\n".join(v.report for v in verdicts))
    failed = sum(not v.held for v in verdicts)
    print("%d of %d expectations held" % (len(verdicts) - failed, len(verdicts)))
    if args.trace is not None:
        print(TRACE_WRITTEN % args.trace)
    if args.json:
        write_json(args.json, result.as_dict(1 if failed else 0))
    return 1 if failed else 0


def cmd_dump(args) -> int:
    from lgnet.fabric import capture
    from lgnet.filters import FilterError, compile_filter
    from lgnet.packets import describe_frame
    from lgnet.lab import find_capture
    path = args.target
    if args.lab is not None or not os.path.isfile(path):
        if args.pcap is None:
            # A running lab's net: its capture is still being written, so follow it.
            path = find_capture(args.target, args.lab)
            args.follow = True
        else:
            path = os.path.join(args.pcap, args.target + capture.CAPTURE_SUFFIX)
        if not os.path.isfile(path):
            raise LgnetError("no capture of net %r in %s yet" % (
                args.target, args.pcap or os.path.dirname(path)))
    if args.count is not None and args.count < 0:
        raise LgnetError("--count wants a number of frames, 0 or more, got %d" % args.count)
    try:
        keep = compile_filter(" ".join(args.filter)) if args.filter else None
    except FilterError as error:
        raise LgnetError(str(error)) from None
    kind = capture.capture_format(path)           # not a capture: exit 2, even with --count 0
    if args.follow:
        if kind != "pcapng":
            raise LgnetError("--follow reads the pcapng a broker is writing; %s is a classic "
                             "pcap: drop --follow" % path)
        frames = ((d.time, d.data, d.comment) for d in capture.follow(path))
    else:
        frames = ((r.ts_ns / abi.NSEC_PER_SEC, r.data, r.comments[0] if r.comments else "")
                  for r in capture.read_capture(path))
    if args.count == 0:
        return 0
    shown, first = 0, None
    try:
        for n, (ts, data, facts) in enumerate(frames, 1):
            first = ts if first is None else first
            if keep is not None and not keep(data):
                continue
            print("%5d %10.6f %s" % (n, ts - first, describe_frame(data, facts)), flush=True)
            shown += 1
            if shown == args.count:
                break
    except BrokenPipeError:
        pass
    return 0


def cmd_impair(args) -> int:
    """Change a running lab's impairments; print what it has afterwards."""
    import json
    from lgnet.fabric.impair import KEYS
    from lgnet.lab import impair_request, lab_socket
    if args.broker:
        socket_path = args.broker
    else:
        socket_path = lab_socket(args.lab)
    if args.link:
        guest, net = args.link
        words = ([args.net] if args.net else []) + args.settings
        if words not in (["down"], ["up"]):
            raise LgnetError("--link GUEST NET wants one word after it: down or up")
        asked = {"do": "link", "guest": guest, "net": net, "down": words == ["down"]}
    elif args.partition:
        asked = {"do": "partition", "groups": [g.split(",") for g in args.partition]}
    elif args.heal:
        asked = {"do": "heal"}
    elif args.net:
        params = {}
        for setting in args.settings:
            key, sep, value = setting.partition("=")
            if not sep or key not in KEYS:
                raise LgnetError("impairment %r: want KEY=VALUE with KEY one of %s"
                                 % (setting, ", ".join(KEYS)))
            params[key] = json_value(value)
        asked = {"do": "set", "net": args.net, "src": args.src, "dst": args.dst,
                 "params": params}
    else:
        asked = {"do": "show"}
    state = impair_request(socket_path, asked)["state"]
    print(json.dumps(state, indent=2))
    return 0


def json_value(text: str):
    """A setting's value as YAML would read it: 0.1, 20, true, '10mbit'."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def cmd_slots(args) -> int:
    from lgnet import netfile
    from lgnet.lab import BROKER_SOCKET, find_lab, find_net, guest_names, running_labs
    from lgnet.uplink import holder
    path = args.net
    lab = find_lab(args.lab) if args.lab is not None else None
    if lab is not None or not os.path.exists(path):
        path = find_net(args.net, lab)
    netfile.require_net_page(path)
    # The lab's broker sits beside its own net files and knows each launcher's guest name;
    # a net file elsewhere (a scenario's `file:`) may belong to any running lab.
    names = guest_names(os.path.join(lab or os.path.dirname(os.path.abspath(path)),
                                     BROKER_SOCKET))
    if not names and lab is None:
        for runtime in running_labs():
            names.update(guest_names(os.path.join(runtime, BROKER_SOCKET)))
    table = netfile.slot_table(path)
    print("%4s  %-17s  %-7s  %-6s  %-12s  %s" % ("slot", "mac", "promisc", "lock", "guest",
                                                 "holder pids"))
    for s in table:
        guest = ", ".join(sorted({names[pid] for pid in s.pids if pid in names})) or "-"
        what = holder(s.mac) if s.locked else None      # an uplink: its TAP, its bridge
        print("%4d  %-17s  %-7s  %-6s  %-12s  %s" % (
            s.slot, s.mac_text, "yes" if s.promisc else "no",
            "held" if s.locked else "stale" if s.stale else "free", guest,
            " ".join(map(str, s.pids)) or ("-" if not s.locked else "(not visible)"))
              + ("  (%s)" % what if what else ""))
    if not table:
        print("(no slot in use)")
    return 0


def cmd_status(args) -> int:
    import json
    from lgnet.lab import status
    labs = status()
    if args.json:
        print(json.dumps(labs, indent=1))
        return 0
    if not labs:
        print("no lab is running")
    for lab in labs:
        print(status_text(lab))
    return 0


def status_text(lab: dict) -> str:
    """One running lab as `lgnet status` prints it."""
    lines = ["%s  (broker pid %s, lab pid %s)" % (lab["scenario"] or "(unknown scenario)",
                                                  lab["broker_pid"], lab["lab_pid"]),
             "  runtime directory %s" % lab["runtime"]]
    if not lab["answering"]:
        return "\n".join(lines + ["  (its broker does not answer)"])
    rows = [("guest", "pid", "net:slot mac", "tx pkts", "rx pkts", "drops", "state")]
    for g in lab["guests"]:
        where = " ".join("%s:%d %s" % (s["net"], s["slot"], s["mac"]) for s in g["slots"])
        c = g["counters"]
        rows.append((g["name"], str(g["pid"]), where or "-", str(c.get("tx_packets", 0)),
                     str(c.get("rx_packets", 0)), str(c.get("rx_dropped", 0)), g["state"]))
    return "\n".join(lines + ["  " + line for line in columns(rows, right=(1, 3, 4, 5))])


def columns(rows: list[tuple], right: tuple[int, ...] = ()) -> list[str]:
    """Rows of cells as aligned text; the last column is left ragged."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))] + [row[-1]])
            for row in rows]


def bindings_text(view) -> str:
    """The dma_hash view as `lgnet bindings` prints it: one row per binding, chain order,
    then what each guest's connection is doing."""
    rows = [("chain", "pos", "guest", "key", "array", "bufs", "free", "used", "next", "irq",
             "used_len")]
    for b in view.bindings:
        used = " ".join("#%d=%s" % (i, "?" if n is None else n)
                        for i, n in enumerate(b.used_len) if n != 0) or "-"
        rows.append((str(b.chain), str(b.position), b.guest, b.key, "%#010x" % b.dmas,
                     str(b.num_dmas), str(b.free), str(b.used), str(b.next_dma),
                     str(b.interrupt), used))
    lines = columns(rows, right=(0, 1, 5, 6, 7, 8, 9)) if view.bindings else ["(no binding)"]
    guests = [("guest", "id", "pid", "state", "irqs raised", "pending DMA")]
    for g in view.guests:
        pending = "dma %#x key %#x" % tuple(g.pending_dma) if g.pending_dma else "-"
        guests.append((g.name, str(g.guest_id), str(g.pid), g.state + (
            ": %s" % g.dead if g.dead else ""), ",".join(map(str, g.irq_flags)) or "-",
            pending))
    return "\n".join(lines + [""] + columns(guests, right=(1, 2)))


def cmd_bindings(args) -> int:
    import json
    import time
    from lgnet import inspector
    from lgnet.lab import BROKER_SOCKET, description, find_lab
    runtime = find_lab(args.lab)
    nets = description(runtime).get("nets", {})
    socket_path = os.path.join(runtime, BROKER_SOCKET)
    try:
        while True:
            view = inspector.query(socket_path, nets).only(args.name)
            if args.json:
                text = json.dumps(view.as_dict(), indent=1)
            else:
                text = bindings_text(view)
            if args.watch is not None:
                print("\033[H\033[2J" + time.strftime("%H:%M:%S ") + runtime, flush=True)
            print(text, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except BrokenPipeError:
        return 0


def cmd_bench(args) -> int:
    from lgnet.bench import make_plan, report, run
    plan = make_plan(sizes=args.sizes, seconds=args.seconds, rounds=args.rounds,
                     guests=args.guests, quick=args.quick)
    unplottable = report.plot_unavailable(args.plot) if args.plot else None
    if unplottable:
        raise LgnetError("--plot %s: %s" % (args.plot, unplottable))   # before a long run
    print("lgnet bench: %d round(s); progress below, the table at the end"
          % plan.options.rounds, flush=True)
    result = run(plan, progress=lambda step: print("  " + step, flush=True))
    print("\n" + report.text(result))
    if args.json:
        report.write_json(result, args.json)
        print("\nwrote %s" % args.json)
    if args.plot:
        skipped = report.plot(result, args.plot)
        print("plot skipped: %s" % skipped if skipped else "wrote %s" % args.plot)
    return 0


def parse_sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("sizes are whole numbers of bytes, comma-separated, "
                                         "got %r" % text) from None


DEFAULT_FRAMES = 12


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("want a whole number from 1, got %r" % text)
    return value


def parser() -> argparse.ArgumentParser:
    from lgnet.fabric.capture import capture_size
    p = argparse.ArgumentParser(prog="lgnet", description="lguest's inter-guest networking "
                                "(Linux 2.6.23), rebuilt as a multi-process simulator.")
    from lgnet.fabric import fastpath
    p.add_argument("--version", action="version", version="lgnet %s (per-frame path: %s)"
                   % (lgnet.__version__, fastpath.label()))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="bring a scenario up: broker + one launcher per guest")
    up.add_argument("scenario", help="a scenario YAML file (see scenarios/)")
    up.add_argument("--duration", type=float, default=None,
                    help="stop after this many seconds (default: when every guest halted)")
    up.add_argument("--pcap", metavar="DIR",
                    help="record every delivery: DIR/<net>.pcapng per net (read it live with "
                         "`lgnet dump`, tshark or scapy)")
    up.add_argument("--uplink", action="append", default=[],
                    metavar="NET=bridge:BR[,vxlan:ID,remote:IP,dev:IF]|NET=tap:NAME",
                    help="join NET to a kernel bridge (or a TAP) beyond this host; replaces "
                         "the scenario's uplink: of that net (needs CAP_NET_ADMIN)")
    up.add_argument("--trace", metavar="FILE", help=TRACE_HELP)
    up.add_argument("--seed", type=int, default=None,
                    help="seed of every impairment decision (default: the scenario's seed:, "
                         "else a fresh one; printed either way)")
    up.add_argument("--json", metavar="FILE", help="also write the results table (counters "
                    "and each guest's ending) to FILE as JSON")
    up.add_argument("--pcap-max", type=capture_size, metavar="BYTES",
                    help="stop each capture file before it grows past BYTES (suffix K, M or "
                         "G); the lab goes on")
    up.set_defaults(func=cmd_up)

    impair = sub.add_parser("impair", help="change a running lab's impairments "
                            "(no arguments: show them)")
    impair.add_argument("net", nargs="?", help="the net a rule is for")
    impair.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="loss=0.1 delay=20 jitter=5 duplicate=0.01 corrupt=0.01 "
                             "rate=1mbit limit=100 down=true; none: the rule goes")
    impair.add_argument("--src", help="only frames this guest sends")
    impair.add_argument("--dst", help="only frames this guest receives")
    impair.add_argument("--link", nargs=2, metavar=("GUEST", "NET"),
                        help="take a guest's link down or up: --link beta lan0 down")
    impair.add_argument("--partition", nargs="+", metavar="G,G",
                        help="split the guests into groups: --partition alpha beta,gamma")
    impair.add_argument("--heal", action="store_true", help="end the partition")
    impair.add_argument("--lab", metavar="DIR|SCENARIO", help="the lab's runtime directory "
                        "(what `lgnet up` prints) or its scenario's name; default: the only "
                        "running lab")
    impair.add_argument("--broker", metavar="PATH", help="the broker's socket")
    impair.set_defaults(func=cmd_impair)

    shell = sub.add_parser("shell", help="bring a scenario up and drive it from a prompt "
                           "(nodes, pingall, console, dump, kill, restart, bindings, ...)")
    shell.add_argument("scenario", help="a scenario YAML file (see scenarios/)")
    shell.add_argument("--pcap", metavar="DIR", help="keep the capture in DIR (the shell "
                       "always captures, for dump)")
    shell.set_defaults(func=cmd_shell)

    test = sub.add_parser("test", help="run a scenario and check its expect: list "
                          "(exit 0 all held, 1 one failed, 2 the scenario is wrong)")
    test.add_argument("scenario", help="a scenario YAML file with an expect: list")
    test.add_argument("--pcap", metavar="DIR", help="keep the capture in DIR")
    test.add_argument("--trace", metavar="FILE", help=TRACE_HELP)
    test.add_argument("--json", metavar="FILE", help="also write every verdict, the "
                      "counters and each guest's ending to FILE as JSON")
    test.set_defaults(func=cmd_test)

    trace = sub.add_parser("trace", help="read a trace of --trace: its deliveries, or draw "
                           "them as a message sequence chart")
    trace.add_argument("file", metavar="FILE", help="a trace written by --trace")
    trace.add_argument("--chart", metavar="OUT.svg",
                       help="draw the first frames as a sequence chart: a lane per guest, an "
                       "arrow per delivery")
    trace.add_argument("-n", "--frames", type=positive, default=DEFAULT_FRAMES, metavar="N",
                       help="how many deliveries (default %d)" % DEFAULT_FRAMES)
    trace.set_defaults(func=cmd_trace)

    dump = sub.add_parser("dump", help="one decoded line per delivered frame of a capture")
    dump.add_argument("target", metavar="PCAP|NET",
                      help="a capture file (pcapng or pcap), a net name with --pcap DIR, or "
                           "a running lab's net")
    dump.add_argument("filter", nargs="*", metavar="EXPRESSION",
                      help="only the frames this pcap-filter(7) expression keeps, as tcpdump "
                           "(e.g. 'udp port 7')")
    dump.add_argument("--pcap", metavar="DIR", help="where `lgnet up --pcap DIR` writes")
    dump.add_argument("--lab", metavar="DIR|SCENARIO",
                      help="NET is this running lab's (default: the only lab with that net); "
                           "its capture is followed live")
    dump.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new frames until the broker stops writing")
    dump.add_argument("-c", "--count", type=int, help="stop after this many frames")
    dump.set_defaults(func=cmd_dump)

    slots = sub.add_parser("slots", help="the live slot table of a net file")
    slots.add_argument("net", metavar="NETFILE|NET",
                       help="a net file, or the name of a running lab's net (lan0)")
    slots.add_argument("--lab", metavar="DIR|SCENARIO",
                       help="the lab: its runtime directory (`lgnet up` prints it) or its "
                            "scenario")
    slots.set_defaults(func=cmd_slots)

    status = sub.add_parser("status", help="this user's running labs: scenario, broker, "
                            "guests with pid, slot, MAC, state and counters")
    status.add_argument("--json", action="store_true", help="as JSON")
    status.set_defaults(func=cmd_status)

    bindings = sub.add_parser("bindings", help="a running lab's dma_hash, live: every "
                              "binding, its receive buffers and each guest's state")
    bindings.add_argument("name", nargs="?", metavar="GUEST|NET",
                          help="only this guest's bindings, or those on this net")
    bindings.add_argument("--lab", metavar="DIR|SCENARIO",
                          help="the lab (its runtime directory or scenario; default: the "
                               "only one running)")
    bindings.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                          help="refresh every SECONDS (default 1) until Ctrl-C")
    bindings.add_argument("--json", action="store_true", help="as JSON")
    bindings.set_defaults(func=cmd_bindings)

    bench = sub.add_parser("bench", help="throughput, latency and scale, with anchors "
                           "measured in the same run")
    bench.add_argument("--sizes", type=parse_sizes, metavar="B,B,...",
                       help="frame sizes (default 60,1514,65536)")
    bench.add_argument("--seconds", type=float, help="measuring time per run (default 1)")
    bench.add_argument("--rounds", type=int, help="rounds; figures are medians (default 3)")
    bench.add_argument("--guests", type=int, metavar="N",
                       help="also fan out to N guests: the scale run (bring-up, RSS)")
    bench.add_argument("--json", metavar="FILE", help="write every figure, the machine and "
                       "the method as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="throughput vs frame size "
                       "(needs matplotlib: pip install 'lgnet[bench]')")
    bench.add_argument("--quick", action="store_true",
                       help="one short round, fan-out to 2 and 8: a smoke test")
    bench.set_defaults(func=cmd_bench)

    from lgnet.fabric.broker import add_arguments as broker_arguments
    from lgnet.guest.launcher import add_arguments as launch_arguments
    broker = sub.add_parser("broker", help="run the Host: the broker launchers connect to")
    broker_arguments(broker)
    broker.add_argument("--quiet", action="store_true")
    broker.set_defaults(func=cmd_broker)

    launch = sub.add_parser("launch", help="run one guest (lguest's Launcher)")
    launch_arguments(launch)
    launch.set_defaults(func=cmd_launch)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command == "dump" and not any(word.startswith("-") for word in extra):
        args.filter += extra           # as tcpdump: options first, then the expression
    elif extra:
        p.error("unrecognized arguments: %s" % " ".join(extra))
    return entry_main(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
