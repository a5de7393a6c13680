"""Attention over the paged KV cache: metadata, backend interface and backends."""

from kvflow.attention.metadata import AttentionMetadata
from kvflow.attention.backends.base import BaseAttentionBackend, create_attention_backend

__all__ = ["AttentionMetadata", "BaseAttentionBackend", "create_attention_backend"]
