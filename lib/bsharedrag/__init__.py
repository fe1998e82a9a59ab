"""BSharedRAG and Parametric RAG: a notebook-first reference implementation."""

__version__ = "0.1.0"
