"""Host liveness in multi-process runs: every survivor notices a lost host within seconds.

JAX's coordination service notices a dead process only after its heartbeat timeout (100 s by
default); meanwhile the survivors block in collectives, and then abort (exit 134) with a C++
trace. Here each process beats into the coordination service's key-value store every `interval`
seconds and watches the other processes' beats on its local clock (no clock sync needed). A host
whose beat has not changed for `timeout` seconds is lost; so is the coordinator (process 0)
when the store has not answered for `timeout` seconds. The watchdog then calls `on_lost(host)`,
from its own thread, whatever the main thread is blocked in.

A process that ends normally marks itself done first, so that its peers do not take its exit
for a loss. When the coordinator itself dies, JAX's client aborts the other processes (SIGABRT,
exit 134) within seconds, before any watchdog can judge; nothing runs inside that abort:
`launch/supervise.sh` reports it from the exit status and the checkpoint directory.
"""
import threading
import time
from typing import Any, Callable, Optional

KEY_PREFIX = "audiomaepp/alive/"
DONE = "done"


class HostWatchdog:
  """Beats for this process and calls `on_lost(host)` once when another host stops beating.

  `client` is the coordination service client (`jax_internals.coordination_client()`, or
  any object with `key_value_set(key, value, allow_overwrite)` and `key_value_dir_get(prefix)`).
  """

  def __init__(self, client: Any, process_id: int, num_processes: int,
               on_lost: Callable[[int], None], timeout: float = 8.0, interval: float = 1.0):
    self._client = client
    self._process_id = process_id
    self._on_lost = on_lost
    self._timeout = timeout
    self._interval = interval
    self._stop = threading.Event()
    self._lock = threading.Lock()
    now = time.monotonic()
    self._last_answer = now
    self._beats: dict[int, str] = {}
    self._changed = {host: now for host in range(num_processes) if host != process_id}
    self._done: set[int] = set()
    self.lost: Optional[int] = None
    self.step = 0  # the step being trained, for the caller's report
    self._threads = [threading.Thread(target=self._beat_loop, name="host-beat", daemon=True),
                     threading.Thread(target=self._judge_loop, name="host-judge", daemon=True)]

  def start(self) -> "HostWatchdog":
    """Starts beating and judging (two daemon threads); returns self."""
    for thread in self._threads:
      thread.start()
    return self

  def note_step(self, step: int) -> None:
    """Records the step being trained (for `on_lost`'s report)."""
    self.step = step

  def wait(self, timeout: float) -> None:
    """Waits up to `timeout` seconds for the watchdog to judge a host lost (and act on it)."""
    self._threads[1].join(timeout)

  def finish(self) -> None:
    """Marks this process done (its exit is not a loss) and stops watching."""
    self._stop.set()
    try:
      self._client.key_value_set(self._key(self._process_id), DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the coordinator is gone: nobody is left to mistake this exit for a loss

  def _key(self, host: int) -> str:
    return f"{KEY_PREFIX}{host}"

  def _beat_loop(self) -> None:
    count = 0
    while not self._stop.is_set():
      count += 1
      try:
        self._client.key_value_set(self._key(self._process_id), str(count), allow_overwrite=True)
        entries = self._client.key_value_dir_get(KEY_PREFIX)
      except Exception:  # pylint: disable=broad-except
        entries = None  # unanswered: the judge counts the silence
      if entries is not None:
        self._record(entries)
      self._stop.wait(self._interval)

  def _record(self, entries: list[tuple[str, str]]) -> None:
    now = time.monotonic()
    with self._lock:
      self._last_answer = now
      for key, value in entries:
        host = int(key.rsplit("/", 1)[-1])
        if host not in self._changed:
          continue
        if value == DONE:
          self._done.add(host)
        elif self._beats.get(host) != value:
          self._beats[host] = value
          self._changed[host] = now

  def silent_host(self) -> Optional[int]:
    """The host that has been silent longest past the timeout, if any (0 if the store is)."""
    now = time.monotonic()
    with self._lock:
      if now - self._last_answer > self._timeout:
        return 0
      silent = [(changed, host) for host, changed in self._changed.items()
                if host not in self._done and now - changed > self._timeout]
    return min(silent)[1] if silent else None

  def _judge_loop(self) -> None:
    while not self._stop.wait(self._interval / 2):
      host = self.silent_host()
      if host is not None:
        self.lost = host
        self._stop.set()
        self._on_lost(host)
        return
