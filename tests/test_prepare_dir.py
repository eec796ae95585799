"""data.prepare_dir: train and eval read the prepared data of another folder (shared by runs)."""

import os

from test_pipeline import write_fake_prepare
from test_train_step import small_config

from retro_jax.config import prepare_dir
from retro_jax.evaluate import evaluate
from retro_jax.train.loop import train


def test_runs_read_a_shared_prepared_folder(tmp_path):
    shared = tmp_path / "shared"
    write_fake_prepare(shared, train_files=2, records_per_file=16)
    config = small_config(steps=2, checkpoint_every=2)
    config.data.prepare_dir = str(shared / "prepare")
    config.eval.max_batches = 1
    run = str(tmp_path / "run")
    assert prepare_dir(config, run) == str(shared / "prepare")
    assert train(config, run)["step"] == 2
    metrics = evaluate(config, run, progress=False)
    assert metrics and not os.path.exists(os.path.join(run, "prepare"))
    assert os.path.isdir(os.path.join(run, "checkpoints", "2"))
    config.data.prepare_dir = ""
    assert prepare_dir(config, run) == os.path.join(run, "prepare")
