"""The `memstore` command: a thin layer over memstore.api and memstore.store."""
from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import sys

import click

from memstore.cluster import LOCAL
from memstore.errors import InvalidInputError, MemstoreError
from memstore.settings import (
    ANSWER_MODES,
    ANSWER_TOKENS,
    CHUNK_OVERLAP,
    CHUNK_TOKENS,
    CONCURRENT_ANSWERS,
    STORE,
    TOP_K,
    WAITING,
    default_model,
    default_store,
)

log = logging.getLogger("memstore.cli")


class Fail(click.ClickException):
    """A one-line error for bad input or setup; exit code 2 unless the error says otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class InternalError(click.ClickException):
    """A bug, not bad input: one line here, the traceback with --verbose; exit code 3."""

    exit_code = 3


def friendly_errors(fn):
    """Turn memstore's errors into one-line messages with their exit code (2 for most), and anything
    else, a bug, into one line with exit code 3 (with --verbose, the traceback instead)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemstoreError as e:
            raise Fail(str(e), e.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if VERBOSE.enabled:
                raise
            raise InternalError(f"internal error ({type(e).__name__}: {e}); run again with --verbose "
                                f"for the traceback") from None

    return wrapper


class VERBOSE:
    enabled = False


def set_verbose(_ctx, _param, value: bool) -> bool:
    """--verbose: memstore's log (per-file failures with their tracebacks) goes to stderr; without it,
    third-party parsers' warnings (pypdf on damaged PDFs) are hidden."""
    if value and not VERBOSE.enabled:
        VERBOSE.enabled = True
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("memstore").addHandler(handler)
        logging.getLogger("memstore").setLevel(logging.DEBUG)
        logging.getLogger("pypdf").setLevel(logging.WARNING)
    elif not VERBOSE.enabled:
        logging.getLogger("pypdf").setLevel(logging.ERROR)
    return value


verbose_option = click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=set_verbose,
                              help="Log each failure with its traceback to stderr.")


def emit(obj, as_json: bool, human=None) -> None:
    """Print `obj` as one JSON document, or through `human` for people."""
    if as_json or human is None:
        click.echo(json.dumps(obj, indent=None if as_json else 2, default=str))
    else:
        human(obj)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
store_option = click.option(
    "--store", "store", default=default_store, show_default=STORE,
    help="Store directory, or a database URL (postgresql+psycopg://...). Env: MEMSTORE_STORE.",
)
data_dir_option = click.option(
    "--data-dir", default=None, help="Directory for the FAISS index of a database-URL store (default: under ~/.local/share/memstore).",
)


def open_memory(store: str, data_dir: str | None, create: bool = False, **kwargs):
    from memstore.api import Memory

    return Memory(store, data_dir=data_dir, create=create, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memstore")
@verbose_option
def main():
    """memstore: an external memory for language models.

    Ingest documents into a store (SQL metadata + FAISS vectors), then search them.
    """


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@store_option
@data_dir_option
@click.option("--glob", default=None, help="Only files whose name (or relative path, if it has a /) matches, e.g. '*.html'.")
@click.option("--chunk-size", default=CHUNK_TOKENS, show_default=True, help="Chunk size in tokens of the embedder's tokenizer.")
@click.option("--overlap", default=CHUNK_OVERLAP, show_default=True, help="Tokens repeated between consecutive chunks.")
@click.option("--prune", is_flag=True, help="Remove documents whose files are gone from the given paths.")
@click.option("--embedder", default=None, help="all-MiniLM-L6-v2 (default) or a local sentence-transformers folder.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="User metadata for every document of this run (repeatable).")
@click.option("--kv", is_flag=True, help="Also compute every chunk's KV memory for --model now (else lazily at ask time).")
@click.option("--model", default=None, help="Model for --kv (default: qwen2.5-0.5b, or $MEMSTORE_MODEL).")
@click.option("--kv-budget", type=float, default=None,
              help="Largest KV memory on disk, GiB; kept in the store for later asks (default: the store's, else 4).")
@click.option("--encoding", default=None,
              help="Encoding of every text file (e.g. cp1252, shift_jis). Default: per file, from its "
                   "byte-order mark, else UTF-8, else a guess; the one used is recorded with the document.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@click.option("--ray", "ray_address", is_flag=False, flag_value=LOCAL, default=None, metavar="[ADDRESS]",
              help="Read, chunk, embed (and with --kv encode) on a Ray cluster: at ADDRESS, or $RAY_ADDRESS, else a Ray "
                   "started here. Needs `pip install 'memstore[ray]'`; files and the store's directory must be "
                   "at the same paths on every node. This process still commits file by file.")
@verbose_option
@json_option
@friendly_errors
def ingest(paths, store, data_dir, glob, chunk_size, overlap, prune, embedder, meta, kv, model, kv_budget,
           encoding, progress, ray_address, as_json):
    """Ingest files and directories (txt, md, rst, html, pdf) into the store.

    Unchanged files are skipped; changed files are replaced; a killed run resumes. A file that
    cannot be read is reported with its reason and the run goes on (its stored version, if any,
    is kept). Exit code 1 when a file failed, 2 on bad input.
    """
    with open_memory(store, data_dir, create=True, embedder=embedder) as mem:
        summary = mem.ingest(list(paths), glob=glob, chunk_size=chunk_size, overlap=overlap,
                             prune=prune, meta=parse_pairs(meta), progress=progress, encoding=encoding,
                             ray=ray_address)
        if kv:
            show = sys.stderr.isatty() if progress is None else progress
            summary["kv"] = mem.build_kv(model, budget_gib=kv_budget, progress=show, ray=ray_address)
    emit(summary, as_json, print_ingest_summary)
    if summary["files_failed"]:
        sys.exit(1)


def print_ingest_summary(s: dict) -> None:
    click.echo(
        f"{s['files_seen']} files: {s['files_ingested']} ingested, {s['files_skipped']} skipped, "
        f"{s['files_failed']} failed; {s['chunks_added']} chunks added, {s['chunks_removed']} removed, "
        f"{s['documents_removed']} documents removed in {s['seconds']:.1f}s"
    )
    if "kv" in s:
        kv = s["kv"]
        rate = f" ({kv['tokens_per_s']:.0f} tokens/s)" if kv["tokens_per_s"] else ""
        click.echo(f"KV memory ({kv['model']}, {kv['weights']} weights): {kv['encoded']} of {kv['chunks']} chunks "
                   f"encoded now{rate}, {kv['kv_bytes'] / 2**20:.0f} MiB on disk, in {kv['seconds']:.1f}s")
    for item in s["skipped"]:
        click.echo(f"  skipped {item['path']}: {item['reason']}")
    for item in s["failed"]:
        click.echo(f"  FAILED {item['path']}: {item['reason']}", err=True)


def parse_pairs(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Fail(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


@main.command()
@click.argument("query")
@store_option
@data_dir_option
@click.option("-k", "k", default=5, show_default=True, help="Number of chunks to return.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="path=GLOB, document_id=N or meta.KEY=VALUE (repeatable; all must match).")
@click.option("--mode", type=click.Choice(["hybrid", "dense", "lexical"]), default="hybrid", show_default=True,
              help="hybrid fuses lexical (BM25) and dense (embedding) rankings.")
@click.option("--rerank", is_flag=True,
              help="Re-score the top 30 candidates with all-mpnet-base-v2 (slower; a chunk's first time "
                   "as a candidate costs about a CPU-second, then its vector is kept in the store).")
@json_option
@friendly_errors
def search(query, store, data_dir, k, filters, mode, rerank, as_json):
    """Find the chunks that best match QUERY (words and meaning)."""
    with open_memory(store, data_dir) as mem:
        hits = [h.to_dict() for h in mem.search(query, k=k, filters=parse_pairs(filters) or None, mode=mode,
                                                rerank=rerank)]
    emit(hits, as_json, print_hits)


def print_hits(hits: list[dict]) -> None:
    if not hits:
        click.echo("no results")
    for n, h in enumerate(hits, 1):
        where = f"{h['source']}:{h['char_start']}-{h['char_end']}"
        heading = f"  [{h['heading_path']}]" if h["heading_path"] else ""
        click.echo(click.style(f"{n}. {h['score']:.4f}  {where}{heading}", bold=True))
        text = " ".join(h["text"].split())
        click.echo(f"   {text[:300]}{'...' if len(text) > 300 else ''}")


@main.command()
@click.argument("question")
@store_option
@data_dir_option
@click.option("--model", default=None, help="Model preset (qwen2.5-0.5b: default, smollm2-135m, qwen2.5-1.5b), HF folder or GGUF file. Env: MEMSTORE_MODEL.")
@click.option("--mode", type=click.Choice(ANSWER_MODES), default="memory", show_default=True,
              help="memory: retrieved chunks in KV-cache slots, plus the chunks of what the answer names; rag: chunks pasted as text.")
@click.option("-k", "k", default=TOP_K, show_default=True, help="Retrieved chunks (memory slots).")
@click.option("--max-new-tokens", default=ANSWER_TOKENS, show_default=True, help="Longest answer, in tokens.")
@click.option("--retrieve-every", default=1, show_default=True, help="Every N decoding steps, read the chunks of terms the answer has newly written (0: only the question's chunks).")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE", help="Restrict retrieval, as in `memstore search`.")
@json_option
@friendly_errors
def ask(question, store, data_dir, model, mode, k, max_new_tokens, retrieve_every, filters, as_json):
    """Answer QUESTION from the store with a language model, citing the chunks it used."""
    with open_memory(store, data_dir) as mem:
        stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
        answer = mem.ask(question, model=model, mode=mode, k=k, max_new_tokens=max_new_tokens,
                         retrieve_every=retrieve_every, filters=parse_pairs(filters) or None, on_token=stream)
    if as_json:
        emit(answer.to_dict(), True)
        return
    click.echo()
    for n, src in enumerate(answer.sources, 1):
        click.echo(f"  [{n}] {src.source}:{src.char_start}-{src.char_end}  attention {src.attention:.2f}")
    t = answer.timings
    click.echo(f"  ({answer.mode}, {answer.model}: first token {t.get('ttft_s', 0):.2f}s, total {t['total_s']:.2f}s)")


@main.command()
@store_option
@data_dir_option
@click.option("--repair", is_flag=True, help="Rebuild the FAISS index from SQL and flag bad documents for re-ingest.")
@json_option
@friendly_errors
def check(store, data_dir, repair, as_json):
    """Verify that SQL and the FAISS index agree. Exit code 0 only when consistent."""
    with open_memory(store, data_dir, on_corrupt_index="defer") as mem:
        report = mem.check()
        if repair and not report["consistent"]:
            report["repair"] = mem.repair()
            report["after_repair"] = mem.check()
            report["consistent"] = report["after_repair"]["consistent"]
    emit(report, as_json, print_check)
    sys.exit(0 if report["consistent"] else 1)


def print_check(r: dict) -> None:
    state = "consistent" if r["consistent"] else "INCONSISTENT"
    click.echo(f"{state}: {r['sql_chunks']} chunks in SQL, {r.get('index_vectors')} vectors in the index")
    for key in ("index_error", "missing_in_index", "extra_in_index", "bad_spans", "lexical_error"):
        if r.get(key):
            click.echo(f"  {key}: {r[key]}")
    if "repair" in r:
        click.echo(f"  repaired: {r['repair']}")
    elif not r["consistent"]:
        click.echo("  run `memstore check --repair` to rebuild the index from SQL")


@main.command()
@store_option
@data_dir_option
@json_option
@friendly_errors
def stats(store, data_dir, as_json):
    """Counts of documents, chunks and tokens, and how the store is built."""
    with open_memory(store, data_dir) as mem:
        emit(mem.stats(), as_json, lambda s: [click.echo(f"{k}: {v}") for k, v in s.items()])


@main.command()
@store_option
@data_dir_option
@json_option
@friendly_errors
def documents(store, data_dir, as_json):
    """List the store's documents: id, source, title, size and the text encoding each was read with."""
    with open_memory(store, data_dir) as mem:
        docs = mem.store.documents()
    emit(docs, as_json, print_documents)


def print_documents(docs: list[dict]) -> None:
    for d in docs:
        click.echo(f"{d['id']:>6}  {d['encoding'] or '-':<10} {d['char_count']:>10} chars  {d['source']}")
    click.echo(f"{len(docs)} documents")


host_option = click.option("--host", default="127.0.0.1", show_default=True,
                           help="Interface to listen on (0.0.0.0 exposes the store to your network).")
port_option = click.option("--port", default=8000, show_default=True, help="TCP port.")
model_option = click.option("--model", default=None,
                            help="Default model preset for answers (default: qwen2.5-0.5b, or $MEMSTORE_MODEL); loaded before serving.")
concurrent_option = click.option("--concurrent", default=CONCURRENT_ANSWERS, show_default=True, type=click.IntRange(1, 16),
                                 help="Answers generated at once, their decoding steps run as one batch (1: one at a time).")
queue_option = click.option("--queue", default=WAITING, show_default=True, type=click.IntRange(0, 1000),
                            help="Answers that may wait for a turn; beyond that a question gets 503 with Retry-After.")


def answer_queue(concurrent: int, waiting: int):
    from memstore.answer_stream import AnswerQueue

    return AnswerQueue(waiting=waiting, concurrent=concurrent)


@main.command()
@store_option
@data_dir_option
@host_option
@port_option
@model_option
@concurrent_option
@queue_option
@click.option("--api-key-file", type=click.Path(dir_okay=False), envvar="MEMSTORE_API_KEY_FILE",
              help="Lines `read KEY` or `write KEY`: requests then need Authorization: Bearer KEY, and adding "
                   "or deleting documents a write key. Without keys only a loopback --host is served. "
                   "[env: MEMSTORE_API_KEY_FILE]")
@friendly_errors
def serve(store, data_dir, host, port, model, concurrent, queue, api_key_file):
    """Serve the HTTP API and the question page over a store.

    POST /ask (and /ask/stream), GET /search, /stats, /documents/{id}, POST /documents,
    DELETE /documents/{id}; OpenAPI docs at /docs.
    """
    from memstore.keys import load_api_keys

    keys = load_api_keys(api_key_file) if api_key_file else None
    with open_memory(store, data_dir) as mem:
        run_server(mem, host, port, model, api_keys=keys, answers=answer_queue(concurrent, queue))


@main.command()
@store_option
@data_dir_option
@model_option
@friendly_errors
def mcp(store, data_dir, model):
    """Serve a store to MCP clients (agents, editors) over stdio.

    Tools: `search` (passages with document, char span and score) and `ask` (an answer with its
    sources); resources: every document, as memstore://documents/{id}. Configure your client to
    launch `memstore mcp --store PATH`; this command then speaks MCP on stdin/stdout.
    """
    try:
        from memstore.mcp_server import build_server
    except ImportError as e:
        raise click.ClickException(f"{e}; install the MCP SDK: pip install 'memstore[mcp]'") from None
    with open_memory(store, data_dir) as mem:
        build_server(mem, model).run("stdio")


@main.command()
@click.option("--store", default=None, help="Where the demo store lives (default: ~/.cache/memstore/demo/CORPUS).")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use this directory of documents instead of the SQLite manual.")
@click.option("--no-fetch", is_flag=True,
              help="Do not try `apt-get download sqlite3-doc`: use a cached or installed copy, else the bundled pages.")
@click.option("--build-only", is_flag=True, help="Build (or update) the demo store, print its summary and exit.")
@host_option
@port_option
@model_option
@concurrent_option
@queue_option
@friendly_errors
def demo(store, corpus, no_fetch, build_only, host, port, model, concurrent, queue):
    """Question answering over the SQLite manual, in your browser.

    Fetches Debian's sqlite3-doc once (public domain; falls back to the pages bundled with
    memstore when it cannot), ingests it into a cached store (a second start reuses it), then
    serves the question page on http://HOST:PORT.
    """
    from memstore import demo as demomod

    say = functools.partial(click.echo, err=True)
    if corpus:
        found = demomod.Corpus(os.path.basename(os.path.abspath(corpus)), [corpus], corpus)
    else:
        found = demomod.demo_corpus(fetch=not no_fetch, say=say)
    store = store or str(demomod.cache_dir() / "demo" / found.name)
    say(f"corpus: {found.note}\nstore: {store}")
    if build_only:
        with open_memory(store, None, create=True) as mem:
            print_ingest_summary(mem.ingest(found.files, progress=sys.stderr.isatty()))
        return
    check_port_free(host, port)
    title = "memstore · ask the SQLite manual" if found.name.startswith("sqlite") else f"memstore · {found.name}"
    examples = demomod.EXAMPLE_QUESTIONS if found.name.startswith("sqlite") else []
    serve_while_building(store, found.files, host, port, model, title=title, examples=examples,
                         answers=answer_queue(concurrent, queue))


def serve_while_building(store: str, files: list, host: str, port: int, model: str | None, **app_options) -> None:
    """Serve at once; ingest `files` and load the model in the background. Pages are searchable
    as they are committed, answers wait for the model, and /stats (the page) says how far both are."""
    import threading

    import uvicorn

    from memstore.ingest.loaders import one_line
    from memstore.server import Readiness, create_app

    check_bind(host, app_options.get("api_keys"))
    say = functools.partial(click.echo, err=True)
    readiness = Readiness(model or default_model())

    def build() -> None:
        try:  # a second handle: its commits reach the server's through the store's generation check
            with open_memory(store, None) as writer:
                summary = writer.ingest(files, on_commit=readiness.ingest_progress)
            print_ingest_summary(summary)
            readiness.ingest_finished("done" if not summary["files_failed"] else f"done, {summary['files_failed']} failed")
        except Exception as e:  # noqa: BLE001 - the server goes on with what was committed
            log.exception("building the store failed")
            readiness.ingest_finished(f"stopped: {one_line(e)}")

    def load(mem) -> None:
        try:
            readiness.model = mem.load_model(model)
            say(f"model {readiness.model} ready")
            readiness.model_loaded()
        except Exception as e:  # noqa: BLE001 - answers then say why they cannot be given
            log.exception("loading the model failed")
            readiness.model_loaded(f"failed: {one_line(e)}")

    with open_memory(store, None, create=True) as mem:
        threading.Thread(target=build, name="demo-ingest", daemon=True).start()
        threading.Thread(target=load, args=(mem,), name="demo-model", daemon=True).start()
        app = create_app(mem, default_model=readiness.model, warm_kv=True, readiness=readiness, **app_options)
        say(f"serving on http://{host}:{port} while the store is built and the model loads "
            f"(API docs: http://{host}:{port}/docs; Ctrl-C stops)")
        uvicorn.run(app, host=host, port=port, log_level="warning")


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            raise Fail(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None


def run_server(mem, host: str, port: int, model: str | None, **app_options) -> None:
    import uvicorn

    from memstore.server import create_app

    check_bind(host, app_options.get("api_keys"))
    check_port_free(host, port)
    say = functools.partial(click.echo, err=True)
    name = mem.load_model(model)
    say(f"model {name} ready")
    app = create_app(mem, default_model=name, warm_kv=True, **app_options)
    say(f"serving on http://{host}:{port}  (API docs: http://{host}:{port}/docs; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def check_bind(host: str, api_keys) -> None:
    """Serving beyond this machine needs API keys."""
    if not api_keys and not is_loopback(host):
        raise InvalidInputError(f"refusing to serve on {host} without API keys: anyone who can reach it could read "
                                "and change the store; give --api-key-file, or serve on 127.0.0.1")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@main.group()
def db():
    """Schema migrations of a store's SQL database."""


def db_command(fn):
    """A `memstore db` subcommand over a store: --store, --data-dir, --json, one-line errors."""
    return db.command()(store_option(data_dir_option(json_option(friendly_errors(fn)))))


def _engine(store: str, data_dir: str | None):
    from memstore.errors import NotAStoreError
    from memstore.store import DB_FILE, resolve_target
    from memstore.store import db as dbmod

    url, _ = resolve_target(store, data_dir)
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        raise NotAStoreError(f"{store} is not a memstore store (no {DB_FILE})")
    return dbmod.make_engine(url)


@db_command
def upgrade(store, data_dir, as_json):
    """Upgrade the schema to the newest revision."""
    from memstore.store import db as dbmod

    engine = _engine(store, data_dir)
    before = dbmod.current_revision(engine)
    after = dbmod.upgrade(engine)
    emit({"from": before, "to": after}, as_json, lambda r: click.echo(f"schema: {r['from']} -> {r['to']}"))


@db_command
def current(store, data_dir, as_json):
    """Show the schema revision of the store and the newest one this memstore knows."""
    from memstore.store import db as dbmod

    engine = _engine(store, data_dir)
    info = {"current": dbmod.current_revision(engine), "head": dbmod.head_revision(engine)}
    info["up_to_date"] = info["current"] == info["head"]
    emit(info, as_json, lambda r: click.echo(f"{r['current']} (head: {r['head']})"))


if __name__ == "__main__":
    main()
