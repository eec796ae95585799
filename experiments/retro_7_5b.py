"""RETRO 7.5B as in the paper (Table 2), its baseline twin, retro-fitting and ablations.

`--config experiments/retro_7_5b.py[:ARG]`, ARG a comma-separated list of `baseline`,
`retrofit=DIR` and `topology=NAME` (see experiments/paper.py).
`retro-jax sweep experiments/retro_7_5b.py --dry-run` lists the ablation runs.
"""

from pathlib import Path

from retro_jax.sweep import load_module

paper = load_module(Path(__file__).with_name("paper.py"))


def get_config(arg: str = ""):
    return paper.paper_config("7.5b", arg)


def get_sweep(arg: str = ""):
    return paper.paper_sweeps("7.5b", arg)
