"""Small RETRO shapes shared by the tests."""

from flax import nnx

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
    cca_zero_init=False,  # drawn CCA outputs: the tests see where neighbours reach at init
)

# Two decoder layers with CCA at layer 2 (train, eval and sample tests pick vocab and chunk).
TWO_LAYERS = dict(
    num_layers=2,
    cca_layers=(2,),
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    enc_d_model=32,
    enc_num_heads=2,
    enc_head_dim=16,
    enc_d_ff=64,
    cca_zero_init=False,
)


# Jitted forward passes of a model (logits, or token_nll's losses). Run op by op, one forward pass
# compiles hundreds of small programs: several seconds each time a test calls it eagerly.
forward = nnx.jit(lambda model, *args: model(*args))
token_nll = nnx.jit(lambda model, *args: model.token_nll(*args))
