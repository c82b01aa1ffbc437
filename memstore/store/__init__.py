"""The storage layer: SQL metadata (schema, db), the FAISS index, lexical search, the KV memory,
and MemoryStore over them. It imports nothing from memstore.ingest, memstore.model or the
application modules (api, cli, server)."""
from memstore.store.memory_store import DB_FILE, MemoryStore, resolve_target
from memstore.store.records import Candidates, ChunkIn, ChunkRecord, DocumentIn, Hit, HybridScores
from memstore.store.search import HYBRID_CANDIDATES

__all__ = ["DB_FILE", "HYBRID_CANDIDATES", "Candidates", "ChunkIn", "ChunkRecord", "DocumentIn", "Hit", "HybridScores", "MemoryStore",
           "resolve_target"]
