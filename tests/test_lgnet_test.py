"""`lgnet test SCENARIO`: the scenario's expect: list checked against the capture.
Exit 0 when every expectation held, 1 when one did not (saying what was seen), 2 when the
scenario itself is wrong (file:line: key: what)."""
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ENV, REPO, lgnet_shm

pytestmark = pytest.mark.timeout(60)

GUESTS = """
networks: {lan0: {}}
guests:
  - {name: alpha, driver: python, nets: [lan0], ip: 10.0.0.1/24}
  - name: beta
    driver: python
    nets: [lan0]
    ip: 10.0.0.2/24
    script: [{ping: 10.0.0.1, count: 1}]
  - {name: gamma, driver: python, nets: [lan0], ip: 10.0.0.3/24}
"""


def lgnet_test(tmp_path, text: str, *extra):
    path = tmp_path / "x.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lgnet", "test", str(path), *map(str, extra)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=45)
    return result, time.monotonic() - started, path


def test_all_expectations_hold_exit_0_and_it_stops_as_soon_as_they_do(tmp_path):
    result, took, _ = lgnet_test(tmp_path, GUESTS + """
expect:
  - {from: beta, to: alpha, match: "who-has and dst host 10.0.0.1", within: 20}
  - {from: alpha, to: beta, match: "echo-reply and src host 10.0.0.1", within: 20}
  - {to: gamma, match: arp, min: 1}
""", "--pcap", tmp_path / "pcap")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 expectations held" in result.stdout
    assert result.stdout.count("\nok     ") == 3
    assert took < 15                      # not the 20 s of `within`: all "at least", all held
    assert (tmp_path / "pcap" / "lan0.pcapng").stat().st_size > 0
    assert lgnet_shm() == []


def test_expect_takes_pcap_filter_expressions_as_tcpdump_reads_them(tmp_path):
    # Byte offsets, named fields, and tcpdump's precedence: the last entry is
    # (arp or icmp) and host 10.0.0.3 — gamma only hears beta's who-has for 10.0.0.1, so 0;
    # read with `and` binding tighter it would count that who-has.
    result, _, _ = lgnet_test(tmp_path, "duration: 3\n" + GUESTS + """
expect:
  - {from: beta, to: alpha, match: "ether[12:2] == 0x0806 and arp[7] == 1", min: 1}
  - {from: alpha, to: beta, match: "icmp[icmptype] == icmp-echoreply and ip[8] > 0", count: 1}
  - {match: "vlan or ip6", count: 0}
  - {to: gamma, match: "arp or icmp and host 10.0.0.3", count: 0}
""")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 of 4 expectations held" in result.stdout


def test_one_expectation_fails_exit_1_with_what_was_seen(tmp_path):
    result, _, path = lgnet_test(tmp_path, "duration: 2\n" + GUESTS + """
expect:
  - {from: alpha, to: beta, match: "echo-reply", count: 1}
  - {from: alpha, to: beta, match: "udp"}
  - {to: gamma, match: "icmp", count: 0}
""")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "ok     %s:14: from alpha, to beta, match 'echo-reply', count 1" % path in out
    assert "FAILED %s:15: from alpha, to beta, match 'udp'\n" % path in out
    assert "wanted at least 1 matching delivery, saw 0" in out
    assert "considered deliveries from alpha to beta:" in out
    failed = out.split("FAILED", 1)[1]
    assert "ARP is at" in failed and "echo-reply" in failed
    assert "[alpha slot" in failed and "-> beta slot" in failed
    assert "2 of 3 expectations held" in out
    assert lgnet_shm() == []


@pytest.mark.parametrize("entry, line, message", [
    ('{to: beta, match: "icmp and", within: 5}', 11,
     "expect[0].match: filter 'icmp and': libpcap: can't parse filter expression: "
     "syntax error"),
    ("{to: delta, match: icmp}", 11,
     "expect[0].to: must be one of the guests ('alpha', 'beta', 'gamma'), got 'delta'"),
    ("{to: beta, count: 1, min: 2}", 11,
     "expect[0].min: cannot be combined with 'count' (line 11)"),
    ("{to: beta, whithin: 5}", 11, "expect[0].whithin: unknown key (did you mean 'within'?) "
                                   "(allowed: from, to, net, "
                                   "match, fault, count, min, within)"),
    ("icmp reaches beta", 11, "expect[0]: must be a mapping, got 'icmp reaches beta'"),
])
def test_a_malformed_expect_exits_2_naming_file_line_and_key(tmp_path, entry, line, message):
    result, took, path = lgnet_test(tmp_path, GUESTS + "expect:\n  - " + entry + "\n")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == "lgnet: %s:%d: %s" % (path, line, message)
    assert took < 10 and result.stdout == ""


def test_no_expect_list_is_a_scenario_error(tmp_path):
    result, _, path = lgnet_test(tmp_path, GUESTS)
    assert result.returncode == 2
    assert "expect: nothing to check" in result.stderr


def test_the_documented_example_scenario_passes():
    result = subprocess.run([sys.executable, "-m", "lgnet", "test",
                             "scenarios/ping-expect.yaml"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=45)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 of 4 expectations held" in result.stdout
