"""What the tests that run `main.py` in subprocesses share: the demo config shrunk to seconds, and
an environment that compiles quickly and caches compilations across a module's runs."""
import os
import signal
import socket
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shrunk_demo(steps: int, checkpoint_every: int,
                eval_every: Optional[int] = None) -> tuple[str, ...]:
  """main.py flags: the demo config with a 64-wide 1 + 1-block model, batch 8, `steps` steps and a
  log line each; one eval batch every `eval_every` steps, or no evaluation when None."""
  flags = ("--config=configs/demo.py", "--config.model.width=64", "--config.model.depth=1",
           "--config.model.decoder_width=64", "--config.model.decoder_depth=1",
           "--config.batch_size=8", f"--config.num_train_steps={steps}",
           "--config.log_every_steps=1", f"--config.checkpoint_every_steps={checkpoint_every}")
  if eval_every is None:
    return flags + ("--config.eval_batches=0",)
  return flags + (f"--config.eval_every_steps={eval_every}", "--config.eval_batches=1")


def fast_env(cache_dir: os.PathLike, devices: Optional[int] = None) -> dict:
  """CPU, a compilation cache in `cache_dir`, XLA's quickest compile (no LLVM optimisation: these
  runs are dominated by compilation; every run compared uses the same flags) and, if given,
  `devices` CPU devices."""
  xla_flags = "--xla_backend_optimization_level=0"
  if devices is not None:
    xla_flags += f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_FLAGS=xla_flags)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on (for a coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def finish(procs: list, timeout: float = 600) -> tuple[list[int], list[str]]:
  """(exit statuses, outputs) of processes started with `start_new_session=True` and text
  output; whatever still runs after `timeout` is killed with its process group."""
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
  return [p.returncode for p in procs], outputs
