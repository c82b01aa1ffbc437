"""The records that cross the storage layer's boundary: chunks and documents going in, hits and
rankings coming out."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from memstore.store import lexical

BATCH = 10_000


@dataclass
class ChunkIn:
    """A chunk to add: its place in the document text and its text."""

    ordinal: int
    char_start: int
    char_end: int
    text: str
    token_count: int
    heading_path: str = ""


@dataclass
class DocumentIn:
    source: str
    content_hash: str
    size: int
    mtime: float
    char_count: int
    title: str | None = None
    meta: dict = field(default_factory=dict)
    encoding: str | None = None


@dataclass
class ChunkRecord:
    """A stored chunk with its document: what crosses from the store to the model and the API."""

    chunk_id: int
    document_id: int
    source: str
    title: str | None
    ordinal: int
    char_start: int
    char_end: int
    heading_path: str
    text: str
    token_count: int
    meta: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def record(self) -> dict:
        """The chunk's own fields (a subclass's extra ones left out), to build another record from."""
        return {f.name: getattr(self, f.name) for f in fields(ChunkRecord)}


@dataclass
class Hit(ChunkRecord):
    """A chunk found by a search, with its score (higher is better)."""

    score: float = 0.0


@dataclass
class Candidates:
    """A search's ranking before it is cut to k, and the lexical side's own scores."""

    ranked: list[tuple[int, float]]  # (chunk id, score), best first: fused in hybrid mode
    lexical: list[tuple[int, float]]  # empty in dense mode


@dataclass
class HybridScores:
    """Every candidate of either side of a hybrid search, scored by both sides."""

    dense_top: list[tuple[int, float]]  # each side's own ranking
    lexical_top: list[tuple[int, float]]
    dense: dict[int, float]  # chunk id -> score, for every candidate
    lexical: dict[int, float]
    rare: list[str]  # the query's rare words (lexical.rare_words)
    holders: set[int]  # the exact matches, put first (MemoryStore._lexical_side)

    def fused(self, fusion: str = "full") -> list[tuple[int, float]]:
        if fusion == "weighted":  # each side's scores over its own candidates only
            return lexical.weighted_fusion(self.dense_top, self.lexical_top)
        if fusion == "rrf":
            return lexical.reciprocal_rank_fusion(self.dense_top, self.lexical_top)
        return lexical.exact_match_first(lexical.full_score_fusion(self.dense, self.lexical), self.holders)
