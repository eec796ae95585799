"""Training logs: W/train/metrics.jsonl, TensorBoard events, a progress bar, MFU, profiles.

metrics.jsonl holds one JSON object per logged step (`step`, `loss`, ...); a resumed run first
cuts the file back to the restored step so that the file reads as one uninterrupted run.
TensorBoard events are written with tensorboard's own pure-Python writer (no TensorFlow needed,
gs:// works when TensorFlow's filesystem is present). Only process 0 writes logs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

# Dense peak FLOP/s per chip by device kind: (bfloat16, float32). float32 matmuls on NVIDIA use
# TF32 (JAX's default precision), on TPUs bf16 passes, so float32 peaks are those rates.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
    "TPU v6e": (918e12, 918e12),
    "NVIDIA H200": (989e12, 494e12),
    "NVIDIA H100": (989e12, 494e12),
    "NVIDIA A100": (312e12, 156e12),
    "NVIDIA L4": (121e12, 60e12),
}
_measured_cpu_peak: float | None = None


def measure_matmul_flops(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a [size, size] matmul in `dtype` on the default device (best of `repeats`)."""
    x = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(device: jax.Device, dtype: str = "float32") -> float:
    """Peak FLOP/s of one device: the table for accelerators, a measured matmul for CPUs.

    Fake CPU devices (--xla_force_host_platform_device_count) share the host's cores, so the
    measured CPU figure is divided among them.
    """
    global _measured_cpu_peak
    kind = device.device_kind
    for name, (bf16, f32) in PEAK_FLOPS.items():
        if kind.startswith(name) or name in kind:
            return bf16 if dtype == "bfloat16" else f32
    if _measured_cpu_peak is None:
        _measured_cpu_peak = measure_matmul_flops()
    same_host = [d for d in jax.local_devices() if d.platform == device.platform]
    return _measured_cpu_peak / max(len(same_host), 1)


class MetricsLog:
    """metrics.jsonl + TensorBoard events of one run (no-ops on processes other than 0)."""

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.dir = epath.Path(workdir) / "train"
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, resume_step)
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(os.fspath(epath.Path(workdir) / "tensorboard"))
        except ImportError:  # tensorboard not installed: jsonl only
            self._tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._write_tensorboard(step, row)

    def _write_tensorboard(self, step: int, row: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        scalars = [
            Summary.Value(tag=name, simple_value=float(value))
            for name, value in row.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        event = Event(wall_time=time.time(), step=int(step), summary=Summary(value=scalars))
        self._tb.add_event(event)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def truncate_metrics(path: epath.Path, last_step: int) -> None:
    """Drop rows after `last_step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut by a kill mid-write
            continue
    if len(keep) != len(rows):
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of W/train/metrics.jsonl."""
    path = epath.Path(workdir) / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value):
    value = np.asarray(value).item() if isinstance(value, (np.ndarray, jax.Array)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    return value


class StepProfiler:
    """A JAX profiler trace of train steps [first, first + count) (1-based) in W/profile/.

    Every process traces its own devices (one `*.xplane.pb` per host under
    W/profile/plugins/profile/<time>/): open it with TensorBoard's profile plugin (`tensorboard
    --logdir W/profile`) or Perfetto (the `*.trace.json.gz` beside it). first = 0: no trace.
    """

    def __init__(self, workdir: str, first: int, count: int):
        self.dir = os.fspath(epath.Path(workdir) / "profile")
        self.first, self.last = int(first), int(first) + max(int(count), 1) - 1
        self.active = False

    def before_step(self, step: int) -> None:
        """Called before running step `step` (1-based)."""
        if self.first > 0 and step == self.first:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        """Called after dispatching step `step`; ends the trace once the last traced step is done
        (waits for `outputs`, so the trace holds the device work, not only its dispatch)."""
        if self.active and step >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if not self.active:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        if jax.process_index() == 0:
            print(f"train: profile of steps {self.first}-{self.last} in {self.dir}", flush=True)


class Progress:
    """A tqdm bar with ETA on a terminal; one plain line per logged step otherwise."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.tty = sys.stderr.isatty()
        self.total = total
        self.bar = (
            tqdm(initial=start, total=total, desc="train", unit="step", dynamic_ncols=True)
            if self.enabled and self.tty
            else None
        )
        self.start_time, self.start_step = time.time(), start

    def update(self, step: int, values: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if values:
                self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
        elif values:
            elapsed = time.time() - self.start_time
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            text = " ".join(f"{k}={format_value(v)}" for k, v in values.items())
            print(f"step {step}/{self.total} {text} eta={eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
