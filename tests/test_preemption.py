"""SIGTERM on one host of several: every host stops after the same step (to save it together)."""

import os
import signal
import socket
import subprocess
import sys
import time

# Two processes with a coordinator on localhost, as `retro-jax train` starts them on a pod slice
# (maybe_initialize_distributed); each counts steps at its own speed and asks _Preemption after
# every step, as the train loop does.
WORKER = """
import sys, time
from retro_jax.train.loop import _Preemption, maybe_initialize_distributed

maybe_initialize_distributed()
import jax

with _Preemption() as preemption:
    print("ready", jax.process_index(), jax.process_count(), flush=True)
    for step in range(1, 20_000):
        time.sleep(0.005 * (1 + jax.process_index()))  # hosts run at different speeds
        if preemption.stop_after(step):
            print("stop after", step, flush=True)
            break
"""


def test_sigterm_on_one_host_stops_every_host_after_the_same_step():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = []
    for index in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(index),
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    first = processes[1].stdout.readline()  # wait until the second host is in its loop
    assert first.startswith("ready 1 2"), first
    time.sleep(1.0)
    processes[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    outputs = [first + p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    stops = [[x for x in out.splitlines() if x.startswith("stop after")] for out in outputs]
    assert len(stops[0]) == len(stops[1]) == 1, outputs
    assert stops[0] == stops[1], outputs
