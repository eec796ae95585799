"""Bad input stops training with one line naming the fault: shards, configs, NaN losses."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_pipeline import write_fake_prepare
from test_train_step import small_config

from retro_jax.errors import RetroError
from retro_jax.train.loop import train

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A run whose learning rate is absurd: (workdir, the RetroError it stopped with)."""
    workdir = tmp_path_factory.mktemp("diverged")
    write_fake_prepare(workdir, train_files=2, records_per_file=16)
    config = small_config(steps=10, warmup_steps=2, learning_rate=1e30, checkpoint_every=1)
    with pytest.raises(RetroError) as error:
        train(config, str(workdir))
    return workdir, str(error.value)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(diverged):
    workdir, message = diverged
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = sorted(int(p) for p in os.listdir(checkpoints) if p.isdigit())
    assert "training stopped" in message and "nan" in message.lower()
    bad_step = int(message.split(" at step ")[1].split(":")[0])
    assert steps and steps[-1] < bad_step
    assert f"last good checkpoint: {os.path.join(checkpoints, str(steps[-1]))}" in message
    params = ocp.StandardCheckpointer().restore(os.path.join(checkpoints, str(steps[-1]), "params"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_config_mismatch_on_resume_names_the_difference(diverged):
    workdir, _ = diverged
    config = small_config(steps=10, learning_rate=1e30, checkpoint_every=1)
    config.model.d_model = 48
    with pytest.raises(RetroError, match=r"model\.d_model: checkpoint 32, config 48"):
        train(config, str(workdir))
    config = small_config(steps=10, learning_rate=1e30, checkpoint_every=1, batch_size=16)
    with pytest.raises(RetroError, match=r"data\.global_batch: checkpoint 8, config 16"):
        train(config, str(workdir))
    # The saved data position means the same next batches only with the same shuffle buffer.
    config = small_config(steps=10, learning_rate=1e30, checkpoint_every=1, shuffle_buffer=8)
    with pytest.raises(RetroError, match=r"data\.shuffle_buffer: checkpoint 1024, config 8"):
        train(config, str(workdir))


def test_missing_shard_is_named(tmp_path):
    prepare = write_fake_prepare(tmp_path, train_files=3, records_per_file=8)
    os.remove(os.path.join(prepare, "train-00002-of-00003.tfrecord"))
    with pytest.raises(RetroError, match="train shard missing: .*train-00002-of-00003.tfrecord"):
        train(small_config(), str(tmp_path))


def test_crc_corrupt_shard_is_named(tmp_path):
    prepare = write_fake_prepare(tmp_path, train_files=2, records_per_file=8)
    path = os.path.join(prepare, "train-00000-of-00002.tfrecord")
    data = bytearray(open(path, "rb").read())
    data[200] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(RetroError, match="corrupt training shard .*train-00000-of-00002.tfrecord"):
        train(small_config(), str(tmp_path))


def test_shards_that_do_not_fit_the_model(tmp_path):
    write_fake_prepare(tmp_path, train_files=1, records_per_file=8)
    config = small_config()
    config.model.chunk_size = 16
    with pytest.raises(RetroError, match="model.chunk_size=16 .* chunk_size=8"):
        train(config, str(tmp_path))
    config = small_config()
    config.model.vocab_size = 32
    with pytest.raises(RetroError, match="model.vocab_size=32"):
        train(config, str(tmp_path))
    with pytest.raises(RetroError, match="prepare/records.json not found"):
        train(small_config(), str(tmp_path / "elsewhere"))
    config = small_config(num_neighbours=5)
    with pytest.raises(RetroError, match="num_neighbours=5 .* store only 4"):
        train(config, str(tmp_path))
    with pytest.raises(RetroError, match=r"train\.steps=0 must be > 0"):
        train(small_config(steps=0), str(tmp_path))
    with pytest.raises(RetroError, match=r"train\.retrieval_dropout=1\.0 must be in \[0, 1\)"):
        train(small_config(retrieval_dropout=1.0), str(tmp_path))
    with pytest.raises(RetroError, match=r"train\.retrieval_distractors=-0\.1 must be in"):
        train(small_config(retrieval_distractors=-0.1), str(tmp_path))


@pytest.mark.parametrize(
    "mesh,train_settings,eval_batch,message",
    [
        # 8 fake devices, all on the batch axes: 12 rows do not split 8 ways.
        (
            {},
            dict(batch_size=12),
            8,
            r"train\.batch_size=12 .* 8 batch devices .*data=8 x mesh\.fsdp=1\)",
        ),
        ({}, dict(batch_size=16, grad_accum=4), 8, r"grad_accum \(16 / 4\)=4 .* 8 batch devices"),
        # The periodic eval: eval.batch_size is checked too (it used to fail inside JAX).
        (
            {},
            dict(eval_every=5),
            6,
            r"eval\.batch_size=6 .* 8 batch devices .*data=8 x mesh\.fsdp=1\)",
        ),
        # data 2 x fsdp 2 x tensor 2: batches split 4 ways.
        (dict(data=2, fsdp=2, tensor=2), dict(eval_every=5), 6, r"eval\.batch_size=6 .* 4 batch "),
    ],
)
def test_batches_that_do_not_split_over_the_mesh_are_named(
    tmp_path, mesh, train_settings, eval_batch, message
):
    write_fake_prepare(tmp_path, train_files=1, records_per_file=8)
    config = small_config(**train_settings)
    config.mesh.update(mesh)
    config.eval.batch_size = eval_batch
    with pytest.raises(RetroError, match=message) as error:
        train(config, str(tmp_path))
    assert "\n" not in str(error.value)
