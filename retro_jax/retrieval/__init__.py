"""Retrieval: frozen-BERT keys of chunks (ChunkEmbedder) and their neighbour index (NeighbourIndex).

scann is imported only by `index.py`, and only when a ScaNN shard is built or loaded.
"""

from retro_jax.retrieval.embed import ChunkEmbedder
from retro_jax.retrieval.index import NeighbourIndex

__all__ = ["ChunkEmbedder", "NeighbourIndex"]
