"""Training: train state, jitted step, Orbax checkpoints, the loop, retro-fitting, logs.

Nothing here imports TensorFlow; only the input pipeline (retro_jax.data.pipeline) does.
"""
