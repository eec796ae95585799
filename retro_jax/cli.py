"""`retro-jax COMMAND --config experiments/X.py[:arg] [--workdir W] [--config.a.b=value ...]`.

Every command reads the same experiment config. Each command is a function `main(config, workdir)`
in the module of its stage, imported only when that command runs (so `retro-jax model-info` needs
neither TensorFlow nor scann). A `RetroError`, an unknown flag or config key, a value that does
not parse and a missing config file are printed as one line with exit code 2 (Ctrl-C: one line,
exit code 130); `--verbose` shows the traceback. `retro-jax COMMAND --help` prints the command's
flags and imports nothing.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from retro_jax.errors import RetroError

# command -> (module, function, one-line help). Only commands that exist are listed.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": (
        "retro_jax.prepare.run",
        "main",
        "build tokenizer, chunk database, keys, index and neighbour shards",
    ),
    "train": ("retro_jax.train.loop", "main", "train RETRO or its baseline twin"),
    "model-info": ("retro_jax.model_info", "main", "parameters, FLOPs and memory of a config"),
    "sweep": ("retro_jax.sweep", "main", "expand and run a sweep of configs"),
    "eval": (
        "retro_jax.evaluate",
        "main",
        "bits-per-byte with/without retrieval, leakage curve",
    ),
    "sample": ("retro_jax.sample.command", "main", "generate with live retrieval"),
    "demo": ("retro_jax.demo", "main", "everything end to end on a real corpus, one table"),
}

# Where `retro-jax COMMAND --help` points for the details.
DOCS = {"prepare": "docs/prepare.md", "train": "docs/train.md", "eval": "docs/eval.md"}
DOCS |= {"sample": "docs/sample.md", "sweep": "docs/experiments.md"}
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")  # never Beam options

# The demo's defaults live in experiments/demo.py of this checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "experiments", "demo.py")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/X.py[:arg])")
flags.DEFINE_string("workdir", None, "experiment folder (local path or gs://)")
flags.DEFINE_bool("verbose", False, "show tracebacks")
# Sampling.
flags.DEFINE_string("prompt", None, "sample: the prompt text")
flags.DEFINE_integer("max_new_tokens", None, "sample: tokens to generate")
flags.DEFINE_float("temperature", None, "sample: softmax temperature")
flags.DEFINE_float("top_p", None, "sample: nucleus sampling mass")
flags.DEFINE_integer("top_k", None, "sample: keep only the k most likely tokens (0: all)")
flags.DEFINE_integer("seed", None, "sample: random seed")
flags.DEFINE_bool("show_neighbours", False, "sample: print the retrieved chunks")
flags.DEFINE_string("prompts", None, "sample: a file of prompts (one per line, or .jsonl)")
flags.DEFINE_string("output", None, "sample: write the results as JSON lines to this file")
# Sweeps: `retro-jax sweep experiments/X.py[:arg] [--sweep=A,B] [--dry-run] [--launcher=tpu]`.
flags.DEFINE_bool("dry_run", False, "sweep: list the runs and their commands, run nothing")
flags.DEFINE_string("sweep", None, "sweep: comma-separated sweeps of the config file (default all)")
flags.DEFINE_enum("launcher", "local", ["local", "tpu"], "sweep: run here or through tpu/run.sh")


def _sweep_argv(argv: list[str]) -> list[str]:
    """`sweep` takes its config file as a positional argument and accepts `--dry-run`."""
    rest = argv[2:]
    if rest and not rest[0].startswith("-"):
        rest[0] = f"--config={rest[0]}"
    return argv[:2] + ["--dry_run" if a == "--dry-run" else a for a in rest]


def _underscore_flags(argv: list[str]) -> list[str]:
    """`--max-new-tokens=8` -> `--max_new_tokens=8` (and `--no-x-y` -> `--nox_y`) for defined
    flags, so both spellings work; config overrides (`--config.a.b`) are left alone."""
    out = argv[:2]
    for arg in argv[2:]:
        name, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and "-" in name and "." not in name:
            negated = name.startswith("no-")
            flag = (name[3:] if negated else name).replace("-", "_")
            if flag in FLAGS:
                arg = f"--{'no' if negated else ''}{flag}{eq}{value}"
        out.append(arg)
    return out


def _beam_argv(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """`prepare --runner=R [Beam options]`: (argv without them, R, the Beam options). Flags
    this CLI does not define are Beam pipeline options (`--direct_num_workers=2`,
    `--project=P`, `--region R`, ...), passed to Beam as given."""
    keep, runner, beam_args = argv[:2], None, []
    rest = iter(argv[2:])
    for arg in rest:
        name, eq, value = arg[2:].partition("=")
        if (
            not arg.startswith("--")
            or arg in HELP_FLAGS
            or name.split(".")[0] in FLAGS
            or name[2:] in FLAGS
        ):
            keep.append(arg)
        elif name == "runner":
            runner = value if eq else next(rest, "")
            if not runner:
                raise RetroError("prepare: --runner needs a value (e.g. --runner=DirectRunner)")
        else:
            beam_args.append(arg)
            if not eq:  # `--option value` (not for boolean flags followed by another flag)
                following = next(rest, None)
                if following is not None and not following.startswith("--"):
                    beam_args.append(following)
                elif following is not None:
                    rest = iter([following, *rest])
    return keep, runner, beam_args


def _usage() -> str:
    lines = ["usage: retro-jax COMMAND --config CFG [--workdir W] [--config.KEY=VALUE ...]", ""]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines + ["", "retro-jax COMMAND --help: the flags of one command"])


def _summary(command: str) -> str:
    """The first paragraph of the docstring of the command's module or function, if it is short
    (one that starts "`retro-jax COMMAND" first), read from the source: nothing is imported."""
    module, function, _ = COMMANDS[command]
    try:
        with open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return ""
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    firsts = [(ast.get_docstring(n) or "").split("\n\n")[0].strip() for n in (tree, *defs)]
    firsts = [f for f in firsts if f and "see docs/" not in f and f.count("\n") < 4]
    firsts.sort(key=lambda f: not f.startswith(f"`retro-jax {command}"))  # stable
    return firsts[0] if firsts else ""


def _command_help(command: str, full: bool = False) -> str:
    """`retro-jax COMMAND --help`: usage, what it does, the flags that apply, where to read on."""
    config = {"sweep": "CFG[:ARG]", "demo": "[--config CFG[:ARG]]"}.get(
        command, "--config CFG[:ARG]"
    )
    usage = [f"usage: retro-jax {command}", config, "[--workdir W]", "[--config.KEY=VALUE ...]"]
    rows = [
        ("CFG[:ARG]" if command == "sweep" else "--config CFG[:ARG]", FLAGS["config"].help),
        ("--config.KEY=VALUE", "override one setting of the config"),
        ("--workdir W", FLAGS["workdir"].help),
        ("--verbose", FLAGS["verbose"].help),
    ]
    if command == "demo":
        rows[0] = (rows[0][0], f"{rows[0][1]}; default experiments/demo.py")
    for name in sorted(FLAGS):  # the command's own flags: their help says "COMMAND: ..."
        flag = FLAGS[name]
        _, mine, text = (flag.help or "").partition(f"{command}: ")
        if mine:
            values = getattr(flag.parser, "enum_values", None)
            value = "|".join(values) if values else flag.flag_type().upper()
            rows.append((f"--{name}" + ("" if flag.boolean else f"={value}"), text))
            usage.append(f"[{rows[-1][0]}]")
    if command == "prepare":
        usage.append("[--runner=R [--BEAM_OPTION=VALUE ...]]")
        rows += [
            ("--runner=R", "build the stages as Apache Beam pipelines on runner R (DirectRunner,"),
            ("", "DataflowRunner, FlinkRunner, ...: docs/prepare_beam.md)"),
            ("--OPTION=VALUE", "with --runner, the other --flags are Beam pipeline options"),
            ("", "(--direct_num_workers=2, --project=P, --region=R, ...)"),
        ]
    lines = [usage.pop(0)]
    for part in usage:  # wrapped at 100 characters
        if len(lines[-1]) + 1 + len(part) > 100:
            lines.append(" " * len(f"usage: retro-jax {command}"))
        lines[-1] += " " + part
    summary = _summary(command)
    lines += ["", COMMANDS[command][2]] + (["", summary] if summary else [])
    lines += ["", "flags:"] + [f"  {a:<22} {b}" for a, b in rows]
    lines += ["", f"more: {DOCS.get(command, 'README.md')}"]
    if full:
        lines += ["", "all flags:", FLAGS.get_help()]
    return "\n".join(lines)


def _flag_error(argv: list[str], error: BaseException) -> str:
    """One line for what went wrong while the flags and the config file were read."""
    if isinstance(error, RetroError):
        return str(error)
    if isinstance(error, flags.Error):  # an unknown flag, a value that does not parse
        return str(error).replace("flag --", "--", 1)
    cause = error
    while cause is not None and not isinstance(cause, KeyError):
        cause = cause.__context__
    if cause is not None and cause.args:  # an override of a key the config lacks
        # ml_collections: "'step'\nDid you mean "steps" instead of "step"?"
        lines = [line.strip() for line in str(cause.args[0]).splitlines() if line.strip()]
        key = lines[0].strip("'\"") if lines else "?"
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        where = next((a for a in bad if key in a.split(".")), "--config.*")
        hint = f" ({lines[-1][0].lower()}{lines[-1][1:]})" if len(lines) > 1 else ""
        return f"{where}: the config has no key {key!r}{hint}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if isinstance(error, OSError):  # the config file: the OS's reason is the last line
        return f"--config: {lines[-1] if lines else error}"
    return f"--config: {type(error).__name__}: {lines[-1] if lines else error}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every failure as one line and exit code 2 (not a traceback)."""
    try:
        rest = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.keys()  # the file now: config_flags reports a failed load lazily
        return rest
    except Exception as e:  # noqa: BLE001 - any failure to read the flags or the config file
        if "--verbose" in argv:
            raise
        print(f"retro-jax {argv[1]}: error: {_flag_error(argv, e)}", file=sys.stderr)
        sys.exit(2)


def _run(argv: list[str], extra: dict) -> None:
    command = argv[1]
    module, function, _ = COMMANDS[command]
    if FLAGS.config is None:
        raise RetroError(f"{command}: --config is required (e.g. --config experiments/tiny.py)")
    getattr(importlib.import_module(module), function)(FLAGS.config, FLAGS.workdir, **extra)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    # Transformers (loaded for BERT's and Hugging Face tokenizers) advises at import that PyTorch
    # is missing; this package uses no PyTorch model, so the line would only add noise.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if argv[1:2] == ["help"] and argv[2:3] and argv[2] in COMMANDS:
        argv = [argv[0], argv[2], "--help"]  # `retro-jax help COMMAND`
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0)
    if argv[1] in COMMANDS and set(argv[2:]) & set(HELP_FLAGS):
        print(_command_help(argv[1], full="--helpfull" in argv[2:]))
        sys.exit(0)
    if argv[1] not in COMMANDS:
        print(f"retro-jax: unknown command {argv[1]!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    if argv[1] == "sweep":
        argv = _sweep_argv(argv)
    if argv[1] == "demo" and not any(a.startswith("--config=") or a == "--config" for a in argv):
        argv.insert(2, f"--config={DEMO_CONFIG}")
    argv = _underscore_flags(argv)
    extra: dict = {}
    if argv[1] == "prepare":
        try:
            argv, runner, beam_args = _beam_argv(argv)
        except RetroError as e:
            print(f"retro-jax prepare: error: {e}", file=sys.stderr)
            sys.exit(2)
        extra = dict(runner=runner, beam_args=beam_args) if runner or beam_args else {}

    def _absl_main(args):
        from retro_jax.host_memory import keep_freed_memory  # not imported by --help

        keep_freed_memory()  # before JAX starts its threads: see retro_jax/host_memory.py
        if not FLAGS.verbose:  # Orbax and TensorFlow log every step at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            _run(args, extra)
        except RetroError as e:
            if FLAGS.verbose:
                raise
            print(f"retro-jax {args[1]}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            if FLAGS.verbose:
                raise
            print(f"\nretro-jax {args[1]}: interrupted (rerun to resume)", file=sys.stderr)
            sys.exit(130)

    # absl parses flags after the command name; the command stays in argv[1]. ml_collections
    # finds `--config.x.y` overrides in sys.argv, not in the argv parsed: main(argv) called from
    # Python (tests, notebooks) must show them there too.
    saved, sys.argv = sys.argv, argv
    try:
        app.run(_absl_main, argv=argv, flags_parser=_parse_flags)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
