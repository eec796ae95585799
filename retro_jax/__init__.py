"""retro_jax: RETRO (Borgeaud et al., 2021) in JAX and Flax NNX.

Data flow: sources -> dedup -> tokenizer -> chunk database -> BERT keys -> index -> neighbour
shards -> input pipeline -> model -> train / eval / sample. Heavy dependencies (TensorFlow, scann)
are imported only by the pipeline stages that need them.
"""

from retro_jax.errors import RetroError

__all__ = ["RetroError"]
__version__ = "0.1.0"
