"""The atheris fuzzer's corpus (tests/fuzz/corpus) replayed, and a short bounded fuzzing run.
The long run's figures are in the notes; `python tests/fuzz/fuzz_loaders.py --help` says how."""
import shutil
import subprocess
import sys
from pathlib import Path

from contract import kind_and_body, loaded_with_encoding

FUZZ = Path(__file__).resolve().parent / "fuzz"


def test_every_corpus_input_loads_cleanly_or_fails_with_a_reason(embedder):
    inputs = sorted((FUZZ / "corpus").iterdir())
    assert len(inputs) >= 15
    kinds = set()
    for path in inputs:
        suffix, body = kind_and_body(path.read_bytes())
        kinds.add(suffix)
        loaded_with_encoding(body, suffix, embedder.tokenizer)
    assert kinds == {".txt", ".md", ".rst", ".html", ".pdf", ""}


def test_a_bounded_fuzzing_run_finds_no_crash(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", corpus)
    done = subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_loaders.py"), str(corpus), "-max_total_time=20", "-max_len=8192",
         "-timeout=20", "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done" in done.stderr and not list(tmp_path.glob("crash-*"))
