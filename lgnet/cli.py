"""`lgnet`: the command line, a face over lab.py and the two wings.

Rules of this file: parsing and printing only. Whatever a Python user of lgnet would need
lives in lab.py, fabric/ or guest/; user errors (LgnetError) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import lgnet
from lgnet import wire
from lgnet.errors import USER_ERROR_EXIT, LgnetError


def cmd_broker(args) -> int:
    from lgnet.fabric.broker import run_broker
    path = args.socket or wire.default_socket_path()
    if args.die_with_parent:
        from lgnet.guest.launcher import die_with_parent
        die_with_parent()
    if not args.quiet:
        print("lgnet broker listening on %s (export LGNET_BROKER=%s)" % (path, path), flush=True)
    try:
        run_broker(path, args.watch_fd, args.ready_fd)
    except OSError as exc:
        raise LgnetError("broker: %s" % (exc.strerror or exc)) from None
    return 0


def cmd_launch(args) -> int:
    from lgnet.guest.images import resolve_kernel
    from lgnet.guest.launcher import LaunchConfig, launch_main
    kernel = resolve_kernel(args.kernel)
    config = LaunchConfig(mem_mb=parse_mem(args.mem), kernel=kernel, args=args.args,
                          sharenets=args.sharenet, block=args.block, initrd=args.initrd,
                          tunnet=args.tunnet, verbose=args.verbose, broker=args.broker,
                          console_input=not args.no_console_input)
    if not kernel.startswith("python:") and not os.path.exists(kernel):
        raise LgnetError("kernel image '%s': no such file" % kernel)
    return launch_main(config, args.die_with_parent)


def cmd_up(args) -> int:
    from lgnet.lab import run_up
    return run_up(args.scenario, duration=args.duration, out=sys.stdout)


def parse_mem(text: str) -> int:
    try:
        mem = int(text)
    except ValueError:
        mem = 0
    if not 1 <= mem <= 1024:
        raise LgnetError("memory must be a whole number of megabytes from 1 to 1024, got %r"
                         % text)
    return mem


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lgnet", description="lguest's inter-guest networking "
                                "(Linux 2.6.23), rebuilt as a multi-process simulator.")
    p.add_argument("--version", action="version", version="lgnet %s" % lgnet.__version__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="bring a scenario up: broker + one launcher per guest")
    up.add_argument("scenario", help="a scenario YAML file (see scenarios/)")
    up.add_argument("--duration", type=float, default=None,
                    help="stop after this many seconds (default: when every guest halted)")
    up.set_defaults(func=cmd_up)

    broker = sub.add_parser("broker", help="run the Host: the broker launchers connect to")
    broker.add_argument("--socket", help="socket path (default: $LGNET_BROKER or per-user)")
    broker.add_argument("--quiet", action="store_true")
    broker.add_argument("--watch-fd", type=int, help=argparse.SUPPRESS)
    broker.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    broker.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)
    broker.set_defaults(func=cmd_broker)

    launch = sub.add_parser("launch", help="run one guest (lguest's Launcher)")
    launch.add_argument("-v", "--verbose", action="store_true")
    launch.add_argument("--sharenet", action="append", default=[], metavar="FILE",
                        help="join the network of this net file (created if missing)")
    launch.add_argument("--block", metavar="FILE", help="a block device backed by FILE")
    launch.add_argument("--initrd", metavar="FILE", help="an initrd placed at the top of RAM")
    launch.add_argument("--tunnet", metavar="IP|bridge:NAME", help="a network to the host")
    launch.add_argument("--broker", help="the broker's socket (default: $LGNET_BROKER)")
    launch.add_argument("--no-console-input", action="store_true",
                        help="do not read stdin into the guest's console")
    launch.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)
    launch.add_argument("mem", metavar="MEM_MB")
    launch.add_argument("kernel", metavar="KERNEL",
                        help="a vmlinux/bzImage, `bundled` for lgnet's own guest kernel, "
                        "or python:MODULE for a Python guest")
    launch.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the guest kernel's command line")
    launch.set_defaults(func=cmd_launch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except LgnetError as exc:
        print("lgnet: %s" % exc, file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
