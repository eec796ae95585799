"""The tiny preset: CPU tests and quick checks. `--config experiments/tiny.py[:baseline]`."""

from retro_jax.config import default_config, model_config_dict


def get_config(arg: str = ""):
    config = default_config()
    config.model = model_config_dict("tiny-baseline" if arg == "baseline" else "tiny")
    return config
