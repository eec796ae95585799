"""Small RETRO shapes shared by the model tests: 4 layers, CCA at 2 and 4, chunks of 4."""

from retro_jax.model import RetroConfig

SMALL = RetroConfig(
    vocab_size=64,
    chunk_size=4,
    num_layers=4,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    cca_layers=(2, 4),
    enc_d_model=16,
    enc_num_heads=2,
    enc_head_dim=8,
    enc_d_ff=32,
)
