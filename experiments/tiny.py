"""The tiny preset: CPU tests and quick checks. `--config experiments/tiny.py[:baseline]`."""

from retro_jax.config import default_config, model_config_dict
from retro_jax.errors import RetroError


def get_config(arg: str = ""):
    if arg not in ("", "baseline"):
        raise RetroError(f"config argument {arg!r}: expected baseline or nothing")
    config = default_config()
    config.model = model_config_dict("tiny-baseline" if arg == "baseline" else "tiny")
    return config
