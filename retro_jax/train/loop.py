"""`retro-jax train --config CFG --workdir W`: train RETRO (or its baseline twin) on W/prepare/.

Phases: set up (hosts, mesh, records) -> build or restore the state -> stream batches through the
jitted step -> log, evaluate and checkpoint on their schedules -> final checkpoint. Rerunning on
the same workdir resumes from the latest checkpoint at exactly the next batch; a finished run
returns at once. SIGTERM (preemption) saves a checkpoint and stops; a NaN/inf loss stops without
saving, so the latest checkpoint is the last good one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from etils import epath

from retro_jax.config import model_config
from retro_jax.config import prepare_dir as prepare_dir_of
from retro_jax.errors import RetroError
from retro_jax.model.create import create_model
from retro_jax.model.info import flops_per_token
from retro_jax.model.load import find_checkpoints, read_model_config
from retro_jax.sharding import check_batch_divides, make_mesh, shard_batch
from retro_jax.train import metrics as metrics_lib
from retro_jax.train.checkpoint import Checkpoints, check_resumable, write_model_config
from retro_jax.train.retrofit import check_baseline, load_baseline, retrofit_schedule
from retro_jax.train.state import ALL_PARAMS, RETROFIT_TRAINABLE, abstract_state, init_state
from retro_jax.train.step import (
    batch_shardings,
    check_batch_split,
    eval_summary,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

# Environment variables that mean "one of several hosts" to jax.distributed.initialize().
_MULTI_HOST_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when launched as one of several processes (TPU pod slice,
    SLURM, Open MPI, or an explicit coordinator); a no-op on one host."""
    env = os.environ
    several = any(name in env for name in _MULTI_HOST_ENV)
    several |= "," in env.get("TPU_WORKER_HOSTNAMES", "")
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        several |= int(env.get(name, "1") or 1) > 1
    if several and not jax.distributed.is_initialized():
        # An explicit coordinator names the processes itself (JAX reads only the address);
        # cluster environments (Cloud TPU, SLURM, Open MPI) are detected by JAX.
        explicit = {}
        if "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env:
            explicit = dict(
                num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"])
            )
        jax.distributed.initialize(**explicit)


class _Preemption:
    """When to stop for a preemption (SIGTERM) or Ctrl-C: `stop_after(step)`, after every step.

    One process: SIGTERM or a first SIGINT (Ctrl-C) sets a flag (a second Ctrl-C aborts at
    once, without saving). Several processes: every host must save the same step and
    stop together, so JAX's preemption service (started by jax.distributed.initialize; it
    catches SIGTERM on any host and the hosts agree on a step) decides, through
    multihost_utils.reached_preemption_sync_point; no Python handler may replace its own.
    """

    def __init__(self):
        self.requested = None  # the name of the signal that asked to stop
        self._previous = {}
        self._shared = jax.process_count() > 1 and _preemption_service_running()
        if jax.process_count() > 1 and not self._shared:
            print(
                "train: warning: JAX's preemption service is off (jax_enable_preemption_service):"
                " a SIGTERM stops only the host that receives it",
                flush=True,
            )

    def __enter__(self):
        if not self._shared and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            print(
                "\ntrain: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)",
                file=sys.stderr,
                flush=True,
            )

    def stop_after(self, step: int) -> bool:
        """True when the run should save `step` and stop (the same step on every host)."""
        if self._shared:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = "SIGTERM"
        return self.requested is not None

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _preemption_service_running() -> bool:
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover (a JAX without it: no shared decision possible)
        return False
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


def _check_records(config, spec, info, model_cfg) -> None:
    """RetroError naming the setting when the shards do not fit the model or the config."""
    if spec.chunk_size != model_cfg.chunk_size:
        raise RetroError(
            f"model.chunk_size={model_cfg.chunk_size} but the shards were prepared with "
            f"chunk_size={spec.chunk_size}"
        )
    if spec.seq_len != config.data.seq_len:
        raise RetroError(
            f"data.seq_len={config.data.seq_len} but the shards hold sequences of {spec.seq_len}"
        )
    vocab = int(info.get("vocab_size", 0))
    if vocab > model_cfg.vocab_size:
        raise RetroError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab}"
        )
    if "pad_id" in info and int(info["pad_id"]) != model_cfg.pad_id:
        raise RetroError(
            f"model.pad_id={model_cfg.pad_id} but the shards pad with {info['pad_id']}"
        )


class _Evaluator:
    """Held-out loss and bits-per-byte over the eval shards, with and without retrieval."""

    def __init__(self, config, prepare_dir, model_def, mesh, retro: bool, k: int):
        from retro_jax.data.pipeline import EvalBatches, keep_continuation

        self.batches = EvalBatches(
            prepare_dir,
            global_batch=int(config.eval.batch_size),
            num_neighbours=k,
            max_batches=int(config.train.eval_batches),
            continuation=keep_continuation(config),
        )
        self.mesh = mesh
        self.modes = {"": make_eval_step(model_def, retrieval=False)}
        if retro and k:
            self.modes = {"retro_": make_eval_step(model_def, retrieval=True), **self.modes}

    def __call__(self, state) -> dict[str, float]:
        sums = {mode: {"nll": 0.0, "tokens": 0.0, "bytes": 0.0} for mode in self.modes}
        for batch in self.batches:
            batch = shard_batch(batch, self.mesh)
            for mode, step in self.modes.items():
                out = jax.device_get(step(state.params, state.frozen, batch))
                for key, value in out.items():
                    sums[mode][key] += float(value)
        values = {}
        for mode, s in sums.items():
            summary = eval_summary(s)
            # retro_eval_* with neighbours, eval_* without (retrieval off / the baseline)
            values[f"{mode}eval_loss"] = summary["loss"]
            values[f"{mode}eval_bpb"] = summary["bpb"]
        return values


def _has_eval_shards(prepare_dir: str, info: dict) -> bool:
    from retro_jax.data.pipeline import listed_files

    listed = listed_files(info, "eval")
    if listed is not None:
        return bool(listed)
    return any(epath.Path(prepare_dir).glob("eval-*-of-*.tfrecord"))


def train(config, workdir: str) -> dict:
    """Train until config.train.steps; returns the last logged metrics (and eval results)."""
    # ---------------------------------------------------------------- set-up
    maybe_initialize_distributed()
    config = retrofit_schedule(config)
    t = config.train
    if int(t.steps) <= 0:
        raise RetroError(f"train.steps={t.steps} must be > 0 (the step to train up to)")
    if not 0.0 <= float(t.retrieval_dropout) < 1.0:
        raise RetroError(f"train.retrieval_dropout={t.retrieval_dropout} must be in [0, 1)")
    if not 0.0 <= float(t.retrieval_distractors) <= 1.0:
        raise RetroError(f"train.retrieval_distractors={t.retrieval_distractors} must be in [0, 1]")
    model_cfg = model_config(config)
    prepare_dir = prepare_dir_of(config, workdir)
    from retro_jax.data.pipeline import load_info  # TensorFlow only for gs:// paths

    spec, info = load_info(prepare_dir)
    _check_records(config, spec, info, model_cfg)
    mesh = make_mesh(config.mesh)
    check_batch_split(int(t.batch_size), int(t.grad_accum), mesh)
    if int(t.eval_every) > 0 and _has_eval_shards(prepare_dir, info):  # the periodic eval
        check_batch_divides(int(config.eval.batch_size), mesh, "eval.batch_size")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    current = {
        "model": model_cfg.to_dict(),
        "data": {
            "seq_len": spec.seq_len,
            "chunk_size": spec.chunk_size,
            "vocab_size": int(info.get("vocab_size", model_cfg.vocab_size)),
            "global_batch": int(t.batch_size),
            "shuffle_seed": int(t.shuffle_seed),
            # The data position means the same batches only for the same records, shuffle
            # buffer and number of hosts (each host reads its own files).
            "shuffle_buffer": int(t.shuffle_buffer),
            "processes": jax.process_count(),
            "train_records": int(info.get("splits", {}).get("train", {}).get("records", 0)),
        },
        "train": {"retrofit_from": str(t.retrofit_from or "")},
    }
    if t.retrofit_from:  # fail before any compilation when the baseline does not fit
        check_baseline(
            read_model_config(find_checkpoints(str(t.retrofit_from))[0]),
            model_cfg,
            str(t.retrofit_from),
        )
    ckpts = Checkpoints(ckpt_dir, keep=int(t.keep_checkpoints))
    try:
        return _run(config, workdir, prepare_dir, ckpts, current, spec, info, model_cfg, mesh)
    finally:
        ckpts.close()


def _run(config, workdir, prepare_dir, ckpts, current, spec, info, model_cfg, mesh) -> dict:
    t = config.train
    ckpt_dir = os.path.join(workdir, "checkpoints")
    k = 0 if model_cfg.is_baseline else int(t.num_neighbours)
    retrieval = not model_cfg.is_baseline and k > 0
    latest = ckpts.latest_step()
    if latest is not None:
        check_resumable(ckpt_dir, latest, ckpts.read_meta(latest), current)
        if latest >= int(t.steps):
            rows = metrics_lib.read_metrics(workdir)
            print(f"train: already finished ({latest} of {t.steps} steps in {ckpt_dir})")
            return {**(rows[-1] if rows else {"step": latest}), "finished": True}

    # ---------------------------------------------------------------- data (bad shards fail here)
    from retro_jax.data.pipeline import TrainBatches, keep_continuation

    position = int(ckpts.read_meta(latest)["position"]) if latest is not None else 0
    batches = TrainBatches(
        prepare_dir,
        global_batch=int(t.batch_size),
        num_neighbours=k,
        seed=int(t.shuffle_seed),
        shuffle_buffer=int(t.shuffle_buffer),
        start=position,
        continuation=keep_continuation(config),
    )
    first = next(batches)

    # ---------------------------------------------------------------- state: fresh or restored
    tx, schedule = make_optimizer(t)
    trainable = RETROFIT_TRAINABLE if t.retrofit_from else ALL_PARAMS
    model = create_model(model_cfg, mesh=mesh, seed=int(config.seed))
    model_def, state, shardings = init_state(model, tx, trainable, seed=int(config.seed), mesh=mesh)
    del model
    if latest is not None:
        state, _ = ckpts.restore(latest, abstract_state(state))
        print(f"train: resuming from step {latest} ({ckpt_dir})", flush=True)
    else:
        if t.retrofit_from:
            state, base_step = load_baseline(str(t.retrofit_from), state, model_cfg)
            print(
                f"train: retro-fitting on the baseline {t.retrofit_from} (step {base_step}) for "
                f"{t.steps} steps of {t.batch_size} sequences"
            )
        write_model_config(ckpt_dir, model_cfg)
    start = int(jax.device_get(state.step))

    # ---------------------------------------------------------------- step, eval, logs
    train_step = make_train_step(
        model_def,
        tx,
        schedule,
        retrieval=retrieval,
        grad_accum=int(t.grad_accum),
        retrieval_dropout=float(t.retrieval_dropout),  # checked in train()
        retrieval_distractors=float(t.retrieval_distractors),
        pad_id=model_cfg.pad_id,
        state_shardings=shardings,
        batch_shardings=batch_shardings(first, mesh),
    )
    evaluate = None
    if int(t.eval_every) > 0 and _has_eval_shards(prepare_dir, info):
        evaluate = _Evaluator(config, prepare_dir, model_def, mesh, not model_cfg.is_baseline, k)
    log = metrics_lib.MetricsLog(workdir, resume_step=start)
    progress = metrics_lib.Progress(start, int(t.steps))
    profiler = metrics_lib.StepProfiler(workdir, int(t.profile_at), int(t.profile_steps))
    tokens_per_step = int(t.batch_size) * spec.seq_len
    flops = flops_per_token(model_cfg, spec.seq_len, k if retrieval else 0) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0], model_cfg.dtype) * len(jax.devices())

    def meta_at(step: int) -> dict:
        return {**current, "position": position + step - start}

    # ---------------------------------------------------------------- the loop
    result: dict = {}
    step, pending, data_wait = start, [], 0.0
    timer_step, timer = start, time.perf_counter()
    batch = shard_batch(first, mesh)
    with jax.set_mesh(mesh), _Preemption() as preemption:
        while step < int(t.steps):
            profiler.before_step(step + 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, step_metrics = train_step(state, batch)
            step += 1
            profiler.after_step(step, step_metrics)
            pending.append((step, step_metrics))
            if step < int(t.steps):  # read the next batch while the device computes this one
                wait_start = time.perf_counter()
                batch = shard_batch(next(batches), mesh)
                data_wait += time.perf_counter() - wait_start
            stop = preemption.stop_after(step)
            eval_now = evaluate is not None and (
                step % int(t.eval_every) == 0 or step == int(t.steps)
            )
            save_now = step % int(t.checkpoint_every) == 0 or step == int(t.steps) or stop
            log_now = step % int(t.log_every) == 0 or eval_now or save_now or step == start + 1
            if not log_now:
                continue
            fetched = jax.device_get(pending)
            pending = []
            for s, m in fetched:
                if not bool(m["finite"]):
                    ckpts.wait()
                    good = ckpts.latest_step()
                    log.close()
                    progress.close()
                    what = (
                        f"loss {float(m['loss'])}, grad norm {float(m['grad_norm'])}"
                        if bool(m["params_finite"])
                        else "parameters became inf/nan"
                    )
                    raise RetroError(
                        f"{what} at step {s}: training stopped; last good checkpoint: "
                        f"{'none' if good is None else os.path.join(ckpt_dir, str(good))}"
                        " (lower train.learning_rate or raise train.warmup_steps)"
                    )
            elapsed = time.perf_counter() - timer
            steps_timed = step - timer_step
            last = fetched[-1][1]
            values = {
                "loss": float(np.mean([float(m["loss"]) for _, m in fetched])),
                "lr": float(last["lr"]),
                "grad_norm": float(last["grad_norm"]),
            }
            if step > start + 1:  # the first step of a process includes compilation
                step_time = elapsed / max(steps_timed, 1)
                values.update(
                    step_time_s=step_time,
                    tokens_per_s=tokens_per_step / step_time,
                    mfu=flops / step_time / peak,
                    data_wait_frac=data_wait / max(elapsed, 1e-9),
                )
            else:
                values["compile_and_step_s"] = elapsed
            if eval_now:
                values.update(evaluate(state))
            if save_now:
                ckpts.save(state, meta_at(step))
            if step % int(t.log_every) == 0 or eval_now or step == int(t.steps) or stop:
                log.write(step, values)
            progress.update(step, values)
            result = {"step": step, **values}
            timer_step, timer, data_wait = step, time.perf_counter(), 0.0
            if stop:
                print(
                    f"train: {preemption.requested} at step {step}: checkpoint saved, "
                    "rerun to resume"
                )
                result["preempted"] = True
                break
    profiler.stop(state)
    log.close()
    progress.close()
    return result


def main(config, workdir: str | None) -> None:
    """`retro-jax train`: see docs/train.md."""
    if not workdir:
        raise RetroError("train: --workdir is required (it holds prepare/, checkpoints/, train/)")
    from absl import flags, logging

    if not (flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS and flags.FLAGS.verbose):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    result = train(config, workdir)
    if jax.process_index() == 0 and result:
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float, bool))}
        print("train: " + " ".join(f"{k}={metrics_lib.format_value(v)}" for k, v in shown.items()))
