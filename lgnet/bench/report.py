"""`lgnet bench`'s face: the Report of lgnet.bench.run as tables (figures, ratios vs the
anchors, where a frame's time goes, fan-out and scale, the Unicorn guests, the targets), as the
--json document and as the --plot. Rules of this room: it formats, it does not measure or
compute figures; every number it shows is in the Report.
"""
from __future__ import annotations

import json
import os

from lgnet.bench.run import UNICORN_ECHO, UNICORN_FLOODER, Report

def human(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "us":
        return "%.1f us" % value
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return "%.3g%s" % (value / scale, suffix)
    return "%.3g" % value


def table(report: Report) -> str:
    m = report.machine
    head = ("lgnet bench: %s cores (%s), Python %s, %s; per-frame path: %s; %d round(s) of "
            "%gs, medians" % (m["cores"], m["cpu_model"], m["python"], report.date[:10],
                              m.get("per_frame_path", "-"), report.options["rounds"],
                              report.options["seconds"]))
    cols = ("workload", "size B", "unit", "lgnet", "socketpair", "netns", "copy limit",
            "lgnet/sp", "lgnet/copy", "lost")
    rows = [cols]
    for r in report.rows:
        fig, unit = r["metric"], r["unit"]
        a = r["anchors"]
        lost = "%.1f%%" % r["lgnet"]["lost_pct"] if "lost_pct" in r["lgnet"] else ""
        unit_text = unit
        if r["kind"] == "latency":
            unit_text = "us p50"
        rows.append((r["label"], str(r["size"]), unit_text, human(r["lgnet"].get(fig), unit),
                     human(a.get("socketpair", {}).get(fig), unit),
                     human(a.get("netns", {}).get(fig), unit) if "skipped" not in a.get("netns", {}) else "skipped",
                     human(a.get("copy", {}).get(fig), unit) if "copy" in a else "",
                     fmt_ratio(r["ratios"].get("socketpair")), fmt_ratio(r["ratios"].get("copy")),
                     lost))
        if r["kind"] == "unicorn":
            py = r["lgnet"].get("python_rtt_p50_us")
            sp = a.get("socketpair", {}).get("rtt_p50_us")
            rows.append(("  (python-driver rtt p50 %s)" % human(py, "us"), "", "us rtt avg",
                         human(r["lgnet"].get("rtt_us"), "us"), human(sp, "us"),
                         human(a.get("netns", {}).get("rtt_p50_us"), "us")
                         if "skipped" not in a.get("netns", {}) else "skipped",
                         "", fmt_ratio(r["ratios"].get("socketpair_rtt")), "", ""))
        if r["kind"] == "latency":
            rows.append(("", "", "us p99", human(r["lgnet"].get("p99_us"), "us"),
                         human(a.get("socketpair", {}).get("p99_us"), "us"),
                         human(a.get("netns", {}).get("p99_us"), "us") if "skipped" not in a.get("netns", {}) else "skipped",
                         "", fmt_ratio(r["ratios"].get("socketpair_p99")), "", ""))
    return head + "\n" + grid(rows)


def fmt_ratio(value) -> str:
    return "" if value is None else "%.2fx" % value


def grid(rows: list[tuple]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown(report: Report) -> str:
    rows = [("per frame (us)", "size B", "wall", "engine", "of it copy", "transport", "waiting",
             "broker cpu", "sender cpu", "receiver cpu", "compiled")]
    for r in report.rows:
        if r["kind"] != "stream":
            continue
        lg = r["lgnet"]
        rows.append(("%s" % r["label"], str(r["size"]), "%.2f" % lg["wall_us"],
                     "%.2f" % lg["broker_engine_us"], "%.2f" % lg["copy_us"],
                     "%.2f" % lg["broker_transport_us"], "%.2f" % lg["broker_wait_us"],
                     "%.2f" % lg["broker_cpu_us"], "%.2f" % lg["sender_cpu_us"],
                     "%.2f" % lg["receiver_cpu_us"], "%.0f%%" % lg.get("compiled_pct", 0.0)))
    return ("Where a frame's time goes (broker: engine = SEND_DMA work incl. the copy; transport"
            " = sockets, doorbells, wake-ups; waiting = idle; compiled = deliveries the"
            " compiled per-frame path made):\n" + grid(rows))


def scaling(report: Report) -> str:
    rows = [("fan-out", "guests", "deliveries/s", "vs N=2", "lost", "bring-up s",
             "RSS MB mean", "RSS MB max", "socketpair", "netns")]
    for r in report.rows:
        if r["kind"] != "fanout":
            continue
        lg, a = r["lgnet"], r["anchors"]
        rows.append((r["label"], str(r["guests"]), human(lg["deliveries_s"]),
                     fmt_ratio(lg.get("vs_fanout_2")), "%.1f%%" % lg["lost_pct"],
                     "%.2f" % lg["bringup_s"], "%.1f" % lg["rss_mb_mean"], "%.1f" % lg["rss_mb_max"],
                     human(a["socketpair"].get("deliveries_s")),
                     human(a["netns"].get("deliveries_s")) if "skipped" not in a["netns"] else "skipped"))
    return "Fan-out and scale:\n" + grid(rows)


def unicorn_lines(report: Report) -> str:
    lines = ["Unicorn guests (bundled kernel, one launcher process each):"]
    row = report.row("unicorn-icmp")
    if row:
        lg = row["lgnet"]
        line = ("  ICMP echo flood %s -> %s: %s round trips/s, rtt avg %s (%d sent, %d received "
                "in %d s)" % (UNICORN_FLOODER, UNICORN_ECHO, human(lg["replies_s"]),
                              human(lg["rtt_us"], "us"), lg["sent"], lg["received"],
                              lg["flood_s"]))
        if "python_rtt_p50_us" in lg:
            line += ("; Python-driver guests: %s round trips/s (rtt p50 %s)"
                     % (human(lg["python_round_trips_s"]), human(lg["python_rtt_p50_us"], "us")))
        lines.append(line)
    scale = report.unicorn_scale or {}
    for t in scale.get("tried", []):
        lines.append("  %d idle on one net: up in %.2f s, RSS %.1f MB per guest on average "
                     "(%.1f MB at most)" % (t["guests"], t["bringup_s"], t["rss_mb_mean"],
                                            t["rss_mb_max"]))
    if "fits" in scale:
        lines.append("  largest number that fits: %d (limit: %s; %.0f MB available, %d MB of "
                     "guest RAM each)" % (scale["fits"], scale["fits_limit"],
                                          scale["mem_available_mb"], scale["guest_mem_mb"]))
    if scale.get("skipped"):
        lines.append("  %s" % scale["skipped"])
    return "\n".join(lines)


def target_lines(report: Report) -> str:
    lines = ["Targets (printed, not asserted):"]
    for t in report.targets:
        if t["measured"] is None:
            state, value = "not run", "-"
        else:
            state = "met" if t["met"] else "NOT met"
            value = "%.2f" % t["measured"]
        lines.append("  %-52s %8s  %s%s" % (t["target"], value, state,
                                            " (%s)" % t["note"] if t["note"] else ""))
    return "\n".join(lines)


def recording_cost(report: Report) -> str:
    cost = report.recording
    if cost is None:
        return "Recording costs: not measured (needs a frame size of at most 1514 B)"
    return ("Recording costs per frame (deep %d B stream, wall time): capture on %+.2f us; "
            "--trace on %+.2f us more than capture alone (%+.2f us in all)"
            % (cost["size"], cost["capture_us"], cost["trace_over_capture_us"],
               cost["trace_us"]))


def text(report: Report) -> str:
    """The whole report as `lgnet bench` prints it."""
    parts = [table(report), "", breakdown(report), "", recording_cost(report), "",
             scaling(report), "", unicorn_lines(report), "", target_lines(report)]
    skipped = next((r["anchors"]["netns"]["skipped"] for r in report.rows
                    if "skipped" in r["anchors"].get("netns", {})), None)
    if skipped:
        parts += ["", "netns anchor skipped: %s" % skipped]
    return "\n".join(parts)


def write_json(report: Report, path: str) -> None:
    with open(path, "w") as out:
        json.dump(report.to_dict(), out, indent=1, sort_keys=False)
        out.write("\n")


PLOT_NEEDS = "matplotlib is not installed (pip install 'lgnet[bench]')"


def plot_unavailable(path: str) -> str | None:
    """Why `plot(report, path)` could not write its file, known before any benchmark runs:
    no matplotlib, or no directory to write into; None when it can."""
    import importlib
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return "%s is not a directory we may write into" % directory
    try:
        importlib.import_module("matplotlib")          # what plot() will need
    except ImportError:
        return PLOT_NEEDS
    return None


def plot(report: Report, path: str) -> str | None:
    """Throughput vs frame size for lgnet and the anchors; None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_NEEDS
    series: dict[str, dict[int, float]] = {}
    for r in report.rows:
        if r["kind"] != "stream":
            continue
        mode = "deep" if "deep" in r["workload"] else "lguest_net"
        series.setdefault("lgnet, %s rx" % mode, {})[r["size"]] = r["lgnet"]["mb_s"]
        for name, fig in r["anchors"].items():
            if "mb_s" in fig:
                series.setdefault(ANCHOR_NAMES[name], {})[r["size"]] = fig["mb_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    for name, points in series.items():
        sizes = sorted(points)
        ax.plot(sizes, [points[s] for s in sizes], marker="o", label=name,
                linestyle="--" if not name.startswith("lgnet") else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frame size (bytes)")
    ax.set_ylabel("verified MB/s")
    m = report.machine
    ax.set_title("lgnet stream vs anchors (%s cores, %s)" % (m["cores"], report.date[:10]),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


ANCHOR_NAMES = {"socketpair": "socketpair (AF_UNIX seqpacket)", "copy": "one-copy limit",
                "netns": "netns + veth + bridge (UDP)"}
