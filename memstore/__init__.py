"""memstore: an external memory for language models."""
from memstore.errors import MemstoreError

__version__ = "0.1.0"


def open(target=":memory:", **kwargs):  # noqa: A001 - mirrors sqlite3.connect / shelve.open
    """Open (or create) a store at a directory path or database URL and return a Memory."""
    from memstore.api import Memory

    return Memory(target, **kwargs)


__all__ = ["open", "MemstoreError", "__version__"]
