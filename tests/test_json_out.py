"""`lgnet up --json FILE` and `lgnet test --json FILE`: the same table and verdicts as printed,
as data."""
import json
import subprocess
import sys

import pytest

from conftest import ENV, REPO

pytestmark = pytest.mark.timeout(90)


def lgnet(*args):
    return subprocess.run([sys.executable, "-m", "lgnet", *args], env=ENV, capture_output=True,
                          text=True, timeout=80)


def printed_table(out: str) -> dict[str, list[str]]:
    """guest -> its printed row's cells (the ending as one cell)."""
    lines = out[out.index("\nguest "):].strip().splitlines()
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        if not cells or cells[0].startswith("("):
            break
        rows[cells[0]] = cells[1:7] + [" ".join(cells[7:])]
    return rows


def test_up_json_is_the_printed_table(tmp_path):
    out = tmp_path / "up.json"
    done = lgnet("up", str(REPO / "scenarios" / "python-guests.yaml"), "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    table = printed_table(done.stdout)
    assert record["status"] == 0 and record["interrupted"] is False
    assert record["scenario"] == str(REPO / "scenarios" / "python-guests.yaml")
    assert [g["name"] for g in record["guests"]] == list(table) == ["alpha", "beta", "gamma"]
    for g in record["guests"]:
        assert [str(g[c]) for c in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes",
                                    "tx_carrier_errors", "rx_dropped")] + [g["ended"]] \
            == table[g["name"]]
        assert g["ended"] == "powered down" and g["killed"] is False
        assert g["tx_packets"] == 4             # one broadcast to 2 peers + 1 unicast each


def test_test_json_holds_every_verdict_as_printed(tmp_path):
    out = tmp_path / "test.json"
    scenario = REPO / "scenarios" / "ping-expect.yaml"
    failing = tmp_path / "failing.yaml"
    failing.write_text(scenario.read_text().replace("count: 0}", "count: 0}\n  - {to: gamma, "
                                                    "match: icmp, min: 1}"))
    done = lgnet("test", str(failing), "--json", str(out))
    assert done.returncode == 1, done.stdout + done.stderr
    record = json.loads(out.read_text())
    assert record["status"] == 1 and record["held"] == 4
    assert [e["held"] for e in record["expectations"]] == [True] * 4 + [False]
    for e in record["expectations"]:
        assert e["report"] in done.stdout
        assert e["report"].startswith(("ok    " if e["held"] else "FAILED") + " " + e["where"])
    assert record["expectations"][2]["matched"] == 3
    assert {g["name"] for g in record["guests"]} == {"alpha", "beta", "gamma"}
    assert "4 of 5 expectations held" in done.stdout
