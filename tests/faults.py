"""Fault injection for the reliability tests: broken audio files, killed process groups, damaged
checkpoints, write errors, and the process/shared-memory bookkeeping that checks nothing leaked.
"""
import os
import pathlib
import signal
import sys
import time

import numpy as np
import soundfile as sf

# Every zoo clip that decodes is this long, so the HEAR API compiles one program for all of them.
CLIP_SECONDS = 1.5


def tone(seconds: float, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
  """A quiet tone `(samples,)` or `(samples, channels)` float32 (compresses well in FLAC)."""
  t = np.arange(int(round(seconds * rate))) / rate
  wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  return np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave


def write_tone_shards(root: pathlib.Path) -> pathlib.Path:
  """TFDS shards of four 2.5 s tones under `root/shards`, all in 'train' (no eval split)."""
  from audiomaepp.data import builders  # pylint: disable=import-outside-toplevel
  from audiomaepp.data import sources  # pylint: disable=import-outside-toplevel
  audio = root / "tone_audio"
  audio.mkdir()
  for i in range(4):
    sf.write(audio / f"clip{i}.wav", tone(2.5, freq=300 + 100 * i), 16000)
  builders.build(sources.Sources(audio_dir=str(audio), eval_fraction=0.0), str(root / "shards"),
                 progress=False)
  return root / "shards"


def write_audio_zoo(folder: pathlib.Path) -> dict[str, tuple[str, str]]:
  """Writes one file per kind of bad (or merely unusual) audio into `folder`.

  Returns {file name: (outcome, detail)}: outcome 'skip' with the reason the builder and
  `load_audio` must give, 'write' with the conversion the builder must report ('' for none), or
  'overflow' for finite float samples so large that their log-mel overflows float32.
  """
  folder.mkdir(parents=True, exist_ok=True)
  sf.write(folder / "good.wav", tone(CLIP_SECONDS), 16000)
  (folder / "empty.wav").write_bytes(b"")
  (folder / "random_bytes.wav").write_bytes(np.random.default_rng(0).bytes(5000))
  sf.write(folder / "whole.flac", tone(3.0), 16000)
  whole = (folder / "whole.flac").read_bytes()
  (folder / "whole.flac").unlink()
  (folder / "truncated.flac").write_bytes(whole[:len(whole) // 2])
  sf.write(folder / "short_0.05s.wav", tone(0.05), 16000)
  sf.write(folder / "rate_8k.wav", tone(CLIP_SECONDS, rate=8000), 8000)
  sf.write(folder / "stereo_48k.flac", tone(CLIP_SECONDS, rate=48000, channels=2), 48000)
  nan = tone(CLIP_SECONDS)
  nan[1000] = np.nan
  sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
  inf = tone(CLIP_SECONDS)
  inf[2000] = -np.inf
  sf.write(folder / "inf.wav", inf, 16000, subtype="FLOAT")
  sf.write(folder / "silence.wav", np.zeros(int(CLIP_SECONDS * 16000), np.float32), 16000)
  # Corrupt float data: finite, but 1e20 squared overflows the float32 power spectrum.
  sf.write(folder / "huge_floats.wav", 1e20 * tone(CLIP_SECONDS), 16000, subtype="FLOAT")
  return {
      "good.wav": ("write", ""),
      "empty.wav": ("skip", "empty file (0 bytes)"),
      "random_bytes.wav": ("skip", "undecodable audio"),
      "truncated.flac": ("skip", "corrupt or truncated"),
      "short_0.05s.wav": ("skip", "too short: 0.050 s"),
      "rate_8k.wav": ("write", "resampled 8000 Hz to 16000 Hz"),
      "stereo_48k.flac": ("write", "downmixed 2 channels to mono"),
      "nan.wav": ("skip", "non-finite samples (NaN or inf) at 0.062 s"),
      "inf.wav": ("skip", "non-finite samples (NaN or inf) at 0.125 s"),
      "silence.wav": ("write", ""),
      "huge_floats.wav": ("overflow", "non-finite log-mel"),
  }


def write_long_file(path: pathlib.Path, seconds: int, rate: int = 8000, channels: int = 1) -> None:
  """A long tone written a minute at a time (the writer never holds the whole clip)."""
  with sf.SoundFile(path, "w", samplerate=rate, channels=channels, subtype="PCM_16") as f:
    minute = tone(60.0, rate=rate, channels=channels)
    for start in range(0, seconds, 60):
      f.write(minute[:(min(60, seconds - start)) * rate])


def session_processes(sid: int) -> list[tuple[int, str]]:
  """(pid, command line) of the live processes in session `sid` (zombies excluded)."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # the process ended while we looked
      continue
    # Fields after the parenthesised command name: state, ppid, pgrp, session, ...
    fields = stat[stat.rindex(")") + 2:].split()
    if int(fields[3]) == sid and fields[0] != "Z":
      found.append((int(entry), cmdline))
  return found


def kill_session(pid: int, timeout: float = 10.0) -> list[tuple[int, str]]:
  """kill -9 the process group led by `pid` (a `start_new_session` child); returns the session's
  processes still alive after `timeout` (empty when everything died)."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  deadline = time.time() + timeout
  while session_processes(pid) and time.time() < deadline:
    time.sleep(0.05)
  return session_processes(pid)


def tagged_processes(tag: str) -> list[int]:
  """Live processes whose environment holds `AUDIOMAEPP_TEST_RUN=<tag>` (children inherit it,
  so this finds a run's processes even if they left its session)."""
  marker = f"AUDIOMAEPP_TEST_RUN={tag}".encode()
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
      try:
        with open(f"/proc/{entry}/environ", "rb") as f:
          if marker in f.read().split(b"\0"):
            found.append(int(entry))
      except OSError:
        continue
  return found


def shm_entries() -> set[str]:
  """Names in /dev/shm (POSIX shared memory segments, semaphores)."""
  return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def unreferenced_shm(names: set[str]) -> set[str]:
  """The entries of `names` still in /dev/shm that no live process maps or holds open. Leaked,
  unless in flight between two processes of a live job (a name in a queue): check again later."""
  remaining = {n for n in names if os.path.exists(f"/dev/shm/{n}")}
  if not remaining:
    return set()
  referenced = set()
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/maps") as f:
        referenced.update(line.rsplit("/dev/shm/", 1)[1].split()[0]
                          for line in f if "/dev/shm/" in line)
      for fd in os.listdir(f"/proc/{entry}/fd"):
        target = os.readlink(f"/proc/{entry}/fd/{fd}")
        if target.startswith("/dev/shm/"):
          referenced.add(target[len("/dev/shm/"):].split()[0])
    except OSError:
      continue
  return remaining - referenced


def with_file_size_limit(command: list[str], max_bytes: int) -> list[str]:
  """`command` (a Python program) run under RLIMIT_FSIZE=`max_bytes`: every write that would grow
  a file beyond it fails with EFBIG, as a full disk fails a checkpoint write. Python ignores
  SIGXFSZ, so the write returns the error. (A re-exec, not a `preexec_fn`: no fork of a
  multithreaded test process.)"""
  assert command[0] == sys.executable
  limit = ("import os, resource, sys; "
           f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, {max_bytes})); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
  return [sys.executable, "-c", limit, *command[1:]]


def main_with_nan_batch(step: int) -> list[str]:
  """`python main.py` (append its flags) whose training batch of `step` is all NaN on every host,
  as if the data or a diverging model had produced it."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  code = (f"import sys; sys.path.insert(0, {tests_dir!r}); import faults; "
          f"faults.poison_training_batch({step}); import main; from audiomaepp.tools import cli; "
          "cli.run(main.main)")
  return [sys.executable, "-c", code]


def poison_training_batch(step: int) -> None:
  """Wraps pretraining's input so that the batch of `step` is all NaN."""
  from audiomaepp.train import pretrain  # pylint: disable=import-outside-toplevel
  train_batches = pretrain.PretrainTask.train_batches

  class Poisoned:
    def __init__(self, iterator, start_step):
      self._iterator, self._step = iterator, start_step

    def __next__(self):
      batch, self._step = next(self._iterator), self._step + 1
      if self._step == step:
        batch = {**batch, "spectrogram": np.full_like(batch["spectrogram"], np.nan)}
      return batch

    def close(self):
      self._iterator.close()

  pretrain.PretrainTask.train_batches = (
      lambda self, start_step, block: Poisoned(train_batches(self, start_step, block), start_step))


def truncate_checkpoint_arrays(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Cuts every array data file of a checkpoint step to a third (a half-copied checkpoint)."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 3)
  return files
