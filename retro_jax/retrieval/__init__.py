"""Retrieval: frozen-BERT keys of chunks (ChunkEmbedder) and their neighbour index (NeighbourIndex).

Both are imported on first use: the chunk database, alignment and neighbour-record modules of
this package need neither JAX nor the BERT (a Beam worker that only chunks text or writes records
starts without them). scann is imported only by `index.py`, and only when a ScaNN shard is built
or loaded.
"""

__all__ = ["ChunkEmbedder", "NeighbourIndex"]


def __getattr__(name: str):
    if name == "ChunkEmbedder":
        from retro_jax.retrieval.embed import ChunkEmbedder

        return ChunkEmbedder
    if name == "NeighbourIndex":
        from retro_jax.retrieval.index import NeighbourIndex

        return NeighbourIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
