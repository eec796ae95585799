"""train.profile_at: a JAX profiler trace of the chosen train steps in W/profile (without it,
no trace: tests/test_retrofit.py's runs check that no W/profile appears)."""

import glob
import gzip
import json
import os

import pytest
from test_pipeline import write_fake_prepare
from test_train_step import small_config

from retro_jax.train.loop import train

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py


def test_profile_traces_the_chosen_steps(tmp_path, capsys):
    write_fake_prepare(tmp_path, train_files=2, records_per_file=16)
    config = small_config(steps=5, profile_at=2, profile_steps=2, checkpoint_every=5)
    result = train(config, str(tmp_path))
    assert result["step"] == 5
    assert "profile of steps 2-3" in capsys.readouterr().out
    runs = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*"))
    assert len(runs) == 1  # one trace, started once and stopped once
    assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    (trace,) = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    # The steps are annotated: exactly the traced step numbers appear.
    steps = {
        int(e["args"]["step_num"])
        for e in events
        if e.get("name") == "train" and "step_num" in e.get("args", {})
    }
    assert steps == {2, 3}
