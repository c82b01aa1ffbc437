"""Library exceptions. Each carries a message that says what went wrong and what to do."""


class MemstoreError(Exception):
    """Base class for every error memstore raises on purpose."""


class NotAStoreError(MemstoreError):
    """The path or URL does not hold a memstore store."""


class IndexCorruptError(MemstoreError):
    """The FAISS index file cannot be read."""


class EmbedderMismatchError(MemstoreError):
    """Vectors from a different embedder than the one the store was built with."""


class UnknownFilterError(MemstoreError):
    """A search filter names a field memstore does not know."""


class SchemaTooNewError(MemstoreError):
    """The database was written by a newer memstore than this one."""


class StoreLockedError(MemstoreError):
    """Another process is writing to the store."""
