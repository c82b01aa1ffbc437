"""API keys for `memstore serve`: a file of lines `read KEY` or `write KEY` (a write key reads too;
blank lines and lines starting with # are skipped). Keys are compared in constant time and never
written to a log or an error message."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import InvalidInputError

ROLES = ("read", "write")
MIN_KEY_CHARS = 16


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
