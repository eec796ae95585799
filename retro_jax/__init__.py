"""retro_jax: RETRO (Borgeaud et al., 2021) in JAX and Flax NNX.

Data flow, one folder or module per step: the corpus (data/: sources, tokenizer, the record
schema) -> prepare/ (leakage filter, chunk database, BERT keys from retrieval/, index, neighbour
records) -> train/ (the model/ network, sharded; checkpoints) -> evaluate.py and sample/ (which
load a trained model through model/load.py, not through train/). Heavy dependencies
(TensorFlow, scann) are imported only by the pipeline stages that need them.
"""

from retro_jax.errors import RetroError

__all__ = ["RetroError"]
__version__ = "0.1.0"
