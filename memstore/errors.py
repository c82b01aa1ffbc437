"""memstore's one error family. Every error raised on purpose is a MemstoreError: its message says
what went wrong and what to do, and it carries the CLI's exit code and the HTTP status the server
answers with. Any other exception is a bug: the CLI exits 3 with one line (the traceback with
--verbose), the server answers 500 and logs the traceback."""


class MemstoreError(Exception):
    """Base class for every error memstore raises on purpose."""

    exit_code = 2  # the CLI's exit status: the input or the setup is wrong, not memstore
    http_status = 400


class InvalidInputError(MemstoreError, ValueError):
    """A bad argument or request: an empty query, an unknown mode, a chunk size out of range.
    Also a ValueError, so code that caught ValueError before the family existed still does."""


class UnknownFilterError(InvalidInputError):
    """A search filter names a field memstore does not know."""


class DoesNotFitError(InvalidInputError):
    """A question or prompt too long for the model's window."""

    http_status = 413


class NotFoundError(MemstoreError, LookupError):
    """Something asked for by id or name is not there: a document, a model offered by the server."""

    http_status = 404


class NotAStoreError(NotFoundError):
    """The path or URL does not hold a memstore store."""


class ModelNotFoundError(MemstoreError):
    """An embedder, re-ranker or generator is not installed or cannot be read; the message says how to get it."""

    http_status = 503


class ChecksumError(ModelNotFoundError):
    """An artifact memstore fetched or found (a model preset's file, the demo's package) does not match
    its pinned SHA-256; nothing made from it is kept."""


class BusyError(MemstoreError):
    """Every place in the server's answer queue is taken; try again after `retry_after` seconds."""

    http_status = 503
    retry_after = 10


class AnswerTimeoutError(MemstoreError):
    """An answer ran past the server's time limit and was stopped."""

    http_status = 504


class LoadError(MemstoreError):
    """A file could not be read into text (reported per file; an ingest run goes on without it)."""

    exit_code = 1  # `memstore ingest` exits 1 when a file failed


class Unsupported(LoadError):
    """A file of a kind memstore does not read (skipped, not failed)."""


class StoreError(MemstoreError):
    """The store itself cannot take the write (an ingest run ends: no later file could be written either)."""


class EmbedderMismatchError(StoreError):
    """Vectors from a different embedder than the one the store was built with."""

    http_status = 409


class SchemaTooNewError(StoreError):
    """The database was written by a newer memstore than this one."""

    http_status = 409


class IndexCorruptError(StoreError):
    """The FAISS index file cannot be read (`memstore check --repair` rebuilds it from SQL)."""

    http_status = 503


class StoreLockedError(StoreError):
    """Another process holds the store's write lock for longer than this one waits."""

    http_status = 503


class KVBudgetError(MemstoreError):
    """The KV memory's byte budget cannot hold what an answer needs."""

    http_status = 507


class BackendMissingError(MemstoreError):
    """The CPU or the torch build lacks a kernel that a requested format needs."""

    http_status = 503


class MissingExtraError(MemstoreError):
    """An optional part (an extra such as Ray) that the request needs is not installed."""

    http_status = 503


class ClusterUnreachableError(MemstoreError):
    """Nothing answers at the Ray cluster address given."""

    http_status = 503
