"""API keys for `memstore serve`: a file of lines `read KEY` or `write KEY` (a write key reads too;
blank lines and lines starting with # are skipped). Keys are compared in constant time and never
written to a log or an error message."""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import InvalidInputError

ROLES = ("read", "write")
MIN_KEY_CHARS = 16
VIEW_LINK_S = 24 * 3600  # how long a signed /view link opens without a key


@dataclass(frozen=True)
class ApiKeys:
    read: tuple[str, ...]
    write: tuple[str, ...]

    def role_of(self, key: str | None) -> str | None:
        """'write', 'read' or None. Every key is compared, whether an earlier one matched or not."""
        if not key:
            return None
        given, found = key.encode(), None
        for role, keys in (("write", self.write), ("read", self.read)):
            for candidate in keys:
                if hmac.compare_digest(candidate.encode(), given) and found is None:
                    found = role
        return found


def load_api_keys(path: str | Path) -> ApiKeys:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InvalidInputError(f"cannot read the API key file {path}: {e.strerror}") from None
    keys: dict[str, list[str]] = {role: [] for role in ROLES}
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2 or fields[0] not in ROLES:
            raise InvalidInputError(f"{path}, line {n}: expected `read KEY` or `write KEY`")
        if len(fields[1]) < MIN_KEY_CHARS:
            raise InvalidInputError(f"{path}, line {n}: a key needs at least {MIN_KEY_CHARS} characters")
        keys[fields[0]].append(fields[1])
    if not any(keys.values()):
        raise InvalidInputError(f"{path} holds no keys")
    return ApiKeys(tuple(keys["read"]), tuple(keys["write"]))


class ViewLinks:
    """Signed /view links. The page opens a source in a new tab, and a tab sends no Authorization
    header, so a link the server hands to a key holder carries an expiry and an HMAC of the document,
    the span and the expiry. The secret is derived from the keys: every server given the same key
    file accepts the others' links, and changing the keys revokes them all."""

    def __init__(self, keys: ApiKeys):
        material = "\0".join(sorted(keys.read + keys.write)).encode()
        self._secret = hashlib.sha256(b"memstore view links\0" + material).digest()

    def sign(self, document_id: int, start: int, end: int, now: float | None = None) -> str:
        """The query parameters to add to the link: `exp=...&sig=...`."""
        expires = int((time.time() if now is None else now) + VIEW_LINK_S)
        return f"exp={expires}&sig={self._mac(document_id, start, end, expires)}"

    def valid(self, document_id: int, start: int, end: int, expires: int, sig: str, now: float | None = None) -> bool:
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._mac(document_id, start, end, expires).encode(), sig.encode())

    def _mac(self, document_id: int, start: int, end: int, expires: int) -> str:
        return hmac.new(self._secret, f"{document_id}:{start}:{end}:{expires}".encode(), "sha256").hexdigest()[:32]
