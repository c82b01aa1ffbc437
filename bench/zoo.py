"""The zoo of bad and odd inputs (tests/zoo.py) through `memstore ingest`, at full size.

Each kind alone into its own new SQLite store, then all kinds together beside two good files
into one SQLite store and one PostgreSQL store whose database name and password are full of
URL-hostile characters. For each: exit code, whether a traceback reached the user, the outcome
and its reason, whether an ingested kind's needle is found by search, and `memstore check`.
Writes bench/results/zoo.json (rewritten after every kind, so a cut-short run keeps what it did).

    python bench/zoo.py [--scale 1.0] [--only NAME ...] [--no-postgres]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import zoo  # noqa: E402
from machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_DB = "memstore zoo %&'$ ü"
PG_URL = ("postgresql+psycopg://postgres:p%40ss%3Aw%25rd%27%26%24@127.0.0.1:5432/"
          "memstore%20zoo%20%25%26%27%24%20%C3%BC")


def ingest(paths: list[str], store: list[str]) -> tuple[dict | None, int, bool, float]:
    started = time.perf_counter()
    code, out, err = zoo.cli("ingest", *paths, *store, "--json")
    seconds = time.perf_counter() - started
    summary = json.loads(out) if out.strip().startswith("{") else None
    return summary, code, "Traceback" in err or "Traceback" in out, round(seconds, 1)


def verify(store: list[str], words: list[str]) -> dict:
    """Which needles search finds, each document's encoding and `check`, through the Python API."""
    import memstore

    target, data_dir = store[1], (store[3] if len(store) > 3 else None)
    try:
        with memstore.open(target, data_dir=data_dir) as mem:
            return {"found": {w: zoo.needle_found(mem, w) for w in words},
                    "encodings": [d["encoding"] for d in mem.store.documents()],
                    "consistent": mem.check()["consistent"]}
    except Exception as e:  # noqa: BLE001 - a store the CLI could not create is a result, not a crash
        return {"found": dict.fromkeys(words, False), "encodings": [], "consistent": False, "error": repr(e)}


def one_by_one(built: dict, work: Path, save) -> list[dict]:
    rows = []
    for name, (kind, word, path) in built.items():
        store = zoo.store_args(str(work / f"store {name} %&'"), None)
        summary, code, traceback, seconds = ingest([str(path)], store)
        seen = verify(store, [word])
        found = seen["found"][word]
        got, reason = zoo.outcome(summary, found) if summary else ("crashed", "")
        rows.append({"kind": name, "expect": kind.expect, "outcome": got, "reason": reason, "exit_code": code,
                     "traceback": traceback, "needle_found": found, "seconds": seconds,
                     "encoding": seen["encodings"][0] if len(seen["encodings"]) == 1 else None,
                     "check_consistent": seen["consistent"],
                     "ok": summary is not None and not traceback and zoo.as_expected(kind, got)
                           and code == (1 if summary["failed"] else 0) and seen["consistent"]})
        print(f"{name:45s} {got:9s} {seconds:7.1f}s  {reason[:70]}", flush=True)
        save(rows)
    return rows


def together(built: dict, good: dict[str, str], store: list[str]) -> dict:
    paths = [str(p) for _, _, p in built.values()] + list(good.values())
    summary, code, traceback, seconds = ingest(paths, store)
    seen = verify(store, list(good) + [word for _, word, _ in built.values()])
    wrong = [name for name, (kind, word, _) in built.items()
             if seen["found"][word] != (kind.expect == zoo.INGESTED) and kind.expect != zoo.HANDLED]
    again, code2, traceback2, seconds2 = ingest(paths, store)
    return {"exit_code": code, "traceback": traceback or traceback2, "seconds": seconds,
            "summary": {k: v for k, v in (summary or {}).items() if not isinstance(v, list)},
            "good_files_found": sum(seen["found"][w] for w in good), "good_files": len(good),
            "kinds_not_as_expected": wrong, "check_consistent": seen["consistent"],
            "rerun": {"exit_code": code2, "files_ingested": (again or {}).get("files_ingested"), "seconds": seconds2}}


def fresh_pg_database() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{PG_DB}"')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="size of the big kinds (1.0: 5 MB line, 200,000 lines)")
    ap.add_argument("--only", nargs="*", help="kind names to run")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memstore zoo 'odd' %&$ "))
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "scale": args.scale, "euid": os.geteuid(),
              "kinds": len(zoo.KINDS if not args.only else args.only), "alone": [], "together": {}}

    def save(rows=None):
        if rows is not None:
            report["alone"] = rows
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        tmp.replace(args.out)

    try:
        built = zoo.build(work / "inputs", args.scale, args.only)
        good = zoo.write_good_files(work / "good")
        one_by_one(built, work, save)
        report["together"]["sqlite"] = together(built, good, zoo.store_args(str(work / "all 100% R&D"), None))
        save()
        if not args.no_postgres:
            fresh_pg_database()
            report["together"]["postgresql"] = together(built, good, zoo.store_args(PG_URL, str(work / "pg data $x")))
            save()
        print(json.dumps(report["together"], indent=1))
    finally:
        os.system(f"chmod -R u+rwx {json.dumps(str(work))}")  # the unreadable kind
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
