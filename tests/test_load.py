"""bench/load_test.py, short: readers, an asker and a writer against a live `memstore serve`
(SmolLM2, loopback) at once. No 5xx, every acknowledged write found by search afterwards, and
`memstore check` clean."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import SQLITE_DOC

import memstore

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_test.py"


def test_a_short_load_test_loses_nothing_and_serves_no_5xx(tmp_path):
    with memstore.open(tmp_path / "store") as mem:
        mem.ingest([SQLITE_DOC / "autoinc.html", SQLITE_DOC / "limits.html"])
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, str(BENCH), "--store", str(tmp_path / "store"), "--model", "smollm2-135m",
                    "--seconds", "10", "--readers", "4", "--askers", "1", "--idle-searches", "20", "--out", str(out)],
                   check=True, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    assert report["server_errors"] == 0, report["status"]
    assert report["acknowledged_writes"] > 0 and report["lost_documents"] == []
    assert report["check"]["consistent"] is True
    assert report["status"]["search"] == {"200": report["search_under_load"]["n"]}
    assert set(report["status"]["write"]) == {"201"} and report["status"]["ask"].get("200", 0) >= 1
