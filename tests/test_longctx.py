"""bench/longctx.py end to end at 8k tokens: every task, the smallest model, the bundled SQLite pages as filler."""
import json
import sys
from pathlib import Path

from conftest import SQLITE_DOC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import longctx  # noqa: E402


def test_tasks_are_seeded_and_scored_by_string_match():
    a, b = longctx.make_case("vartrack", 8000, 0), longctx.make_case("vartrack", 8000, 0)
    assert a == b and a != longctx.make_case("vartrack", 8000, 1)
    chain = a.expected
    assert 2 <= len(chain) <= 4 and any(chain[0] in f and "=" in f for f in a.facts)
    assert longctx.score(a, " ".join(chain).lower()) == 1.0
    assert longctx.score(a, chain[0]) == 1 / len(chain)
    qa = longctx.Case(["x"], "q?", ["Paris", "the capital"], need_all=False)
    assert longctx.score(qa, "It is paris.") == 1.0 and longctx.score(qa, "Rome") == 0.0
    hop = longctx.make_case("twohop", 8000, 3)
    assert hop.extra["bridge"] in hop.facts[0] and hop.expected[0] in hop.facts[1]
    assert longctx.effective_length({8000: 0.9, 32000: 0.86, 128000: 0.5, 1000000: 0.9}) == 32000
    assert longctx.effective_length({8000: 0.5}) is None


def test_the_suite_runs_at_8k_and_scores_land_in_a_sane_range(tmp_path):
    tasks = [t for t in longctx.TASKS if t != "qa" or longctx.DEV_DOCS.exists()]
    out = tmp_path / "longctx.json"
    args = longctx.parse_args(["--lengths", "8k", "--seeds", "1", "--model", "smollm2-135m", "--tasks", *tasks,
                               "--modes", "rag", "memory_once", "memory", "--max-new-tokens", "24",
                               "--filler", *map(str, sorted(SQLITE_DOC.glob("*.html"))),
                               "--data", str(tmp_path / "data"), "--out", str(out)])
    report = longctx.run(args)
    assert json.loads(out.read_text())["trials"] == report["trials"]
    rows = report["trials"]
    assert {(r["task"], r["mode"]) for r in rows} == {(t, m) for t in tasks for m in args.modes}
    assert all(0.0 <= r["score"] <= 1.0 and r["total_s"] > 0 for r in rows)
    assert 8000 <= rows[0]["length"] < 10000
    # retrieval finds a single needle's chunk in every mode that retrieves, whatever the small model answers
    needles = [r for r in rows if r["task"].startswith("niah")]
    assert all(r["needed_facts_in_sources"] == 1.0 for r in needles)
    assert sum(r["score"] for r in needles) / len(needles) >= 0.3  # SmolLM2 reads most needles it is given
    summary = report["summary"]["memory"]
    assert set(summary["cells"]) == set(tasks) and summary["retrieval_tasks_mean"]["8k"] is not None

    # a second run with --resume asks nothing again
    again = longctx.run(longctx.parse_args([*sys_args(args), "--resume"]))
    assert again["trials"] == rows

    # the report split in two (as runs split by task would be) joins into the same trials and summary
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    for part, keep in zip(parts, (rows[:5], rows[5:] + rows[:2])):
        part.write_text(json.dumps(dict(report, trials=keep)))
    joined = longctx.combine(parts, tmp_path / "joined.json")
    assert joined["trials"] == rows and joined["summary"] == report["summary"]
    assert json.loads((tmp_path / "joined.json").read_text())["combined_from"] == [str(p) for p in parts]


def sys_args(args) -> list[str]:
    return ["--lengths", *args.lengths, "--seeds", str(args.seeds), "--model", args.model, "--tasks", *args.tasks,
            "--modes", *args.modes, "--max-new-tokens", str(args.max_new_tokens),
            "--filler", *map(str, args.filler), "--data", str(args.data), "--out", str(args.out)]
