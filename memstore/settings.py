"""Defaults that several entry points share (the Python API, the CLI, the HTTP and MCP servers):
one value here, so `memstore ask` and `Memory.ask` answer the same question the same way."""

ANSWER_TOKENS = 48  # the longest answer, in tokens
TOP_K = 4  # chunks retrieved for an answer (the memory slots the question fills)
