#!/usr/bin/env python3
"""Coverage-guided fuzzing of the loaders and the chunker with atheris (libFuzzer).

    python tests/fuzz/fuzz_loaders.py tests/fuzz/corpus -max_total_time=600 -max_len=8192

An input's first byte picks the kind of file (txt, md, rst, html, pdf or no extension) and the
rest is the file. Loading it must give blocks whose chunks quote the document text at their
offsets, or a LoadError with a reason; any other exception, a hang (-timeout) or running out of
memory (-rss_limit_mb) is a crash, written by libFuzzer as crash-*/timeout-*/oom-*. Inputs that
reach new code are added to the first corpus directory: tests/fuzz/corpus keeps them.
"""
import os
import sys
from pathlib import Path

import atheris

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

with atheris.instrument_imports():
    import bs4  # noqa: F401 - instrumented so coverage guides the fuzzer through the parsers too
    import pypdf  # noqa: F401
    from contract import kind_and_body, loaded_with_encoding

    from memstore.ingest import chunking, loaders  # noqa: F401

_tokenizer = None


def tokenizer():
    global _tokenizer
    if _tokenizer is None:
        from memstore.ingest.embed import load_embedder

        _tokenizer = load_embedder().tokenizer
    return _tokenizer


def one_input(data: bytes) -> None:
    suffix, body = kind_and_body(data)
    loaded_with_encoding(body, suffix, tokenizer())


def main() -> None:
    tokenizer()  # loaded before fuzzing starts, so its time is not taken for a hang
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
