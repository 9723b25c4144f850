"""Which audio files become which records: folder listing, AudioSet CSVs, splits, per-file encoding.

Two layouts:
  * AudioSet: audio files plus segment CSVs (`YTID, start_seconds, end_seconds,
    "positive_labels"`, '#' comment lines) and the class index CSV (`index,mid,display_name`).
    A file belongs to the row whose YTID is its stem, its stem without a leading 'Y' (the
    `Y<ytid>.wav` naming of common downloaders) or the first 11 characters of either (for
    `<ytid>_<start>.wav`). Its split is the split of the CSV (`split=path`, or inferred: a file
    name containing 'eval' is the 'eval' split, anything else 'train'). Record id: the YTID.
  * A plain folder (no CSVs): no labels; a deterministic held-out fraction goes to 'eval': the
    files whose SHA-1 of the relative path ranks lowest, `max(1, round(fraction * n))` of them
    (none when there is a single file). Record id: the relative path.
Files are discovered recursively by extension and sorted by relative path, so a listing (and the
records built from it) depends only on the inputs.
"""
import collections
import csv
import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np

from audiomaepp import audio

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif",
                              ".au", ".w64", ".rf64", ".caf"})
# Clips shorter than this are skipped: under 0.1 s (11 frames) a clip holds fewer than three
# 4-frame patches of signal, and tiling it to 200 frames would repeat it 20 times or more.
DEFAULT_MIN_DURATION_S = 0.1
DEFAULT_EVAL_FRACTION = 0.1
_YTID_LENGTH = 11


@dataclasses.dataclass(frozen=True)
class Sources:
  """The inputs of a build: an audio folder and, for AudioSet layouts, the CSVs."""
  audio_dir: str
  segments_csvs: tuple[tuple[str, str], ...] = ()  # (split, path) pairs
  labels_csv: Optional[str] = None
  eval_fraction: float = DEFAULT_EVAL_FRACTION  # folder layout only
  min_duration_s: float = DEFAULT_MIN_DURATION_S

  def __post_init__(self):
    if not os.path.isdir(self.audio_dir):
      raise FileNotFoundError(f"audio_dir {self.audio_dir!r} is not a directory")
    if bool(self.segments_csvs) != bool(self.labels_csv):
      raise ValueError("the AudioSet layout needs both segments CSVs and the labels CSV (got "
                       f"segments_csvs={self.segments_csvs!r}, labels_csv={self.labels_csv!r})")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True)
class Clip:
  """One audio file to encode: where it is, its record id, split and label indices."""
  path: str
  file: str  # relative to the audio folder, for reports
  id: str
  split: str
  labels: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Listing:
  """The result of matching files to splits, before any audio is decoded."""
  clips: dict[str, list[Clip]]  # split -> clips in id order
  skipped: list[tuple[str, Optional[str], str]]  # (relative path, split if known, reason)
  num_files: int  # audio files found
  skipped_dirs: list[tuple[str, str]]  # (relative path, reason): directory links not followed
  missing: int  # segment rows no audio file matched (AudioSet layout)
  splits: tuple[str, ...] = ()  # the splits the inputs ask for, even those left without clips


@dataclasses.dataclass(frozen=True)
class Encoded:
  """The outcome of encoding one clip: an example for the builder, or the reason it was skipped."""
  clip: Clip
  example: Optional[dict] = None
  reason: Optional[str] = None
  conversions: tuple[str, ...] = ()


def parse_segments_arg(value: str) -> tuple[str, str]:
  """'split=path' -> (split, path); a bare path is 'eval' if its name says so, else 'train'."""
  split, sep, path = value.partition("=")
  if not sep:
    path = value
    split = "eval" if "eval" in os.path.basename(value).lower() else "train"
  if not split or not path:
    raise ValueError(f"segments CSV {value!r}: expected PATH or SPLIT=PATH")
  return split, path


def read_label_index(path: str) -> tuple[list[str], list[str]]:
  """AudioSet `class_labels_indices.csv` -> (mids, display names) ordered by index."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f, skipinitialspace=True))
  if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
    raise ValueError(f"{path}: expected a CSV with columns index,mid,display_name")
  rows.sort(key=lambda r: int(r["index"]))
  if [int(r["index"]) for r in rows] != list(range(len(rows))):
    raise ValueError(f"{path}: class indices must be 0..{len(rows) - 1} without gaps")
  mids = [r["mid"] for r in rows]
  names = [r["display_name"] for r in rows]
  for what, values in (("mid", mids), ("display_name", names)):
    dupes = [v for v, n in collections.Counter(values).items() if n > 1]
    if dupes:
      raise ValueError(f"{path}: duplicate {what} values {dupes[:5]}")
  return mids, names


def read_segments(path: str) -> dict[str, list[str]]:
  """AudioSet segments CSV -> {YTID: [label mids]} (comment lines start with '#')."""
  segments = {}
  with open(path, newline="") as f:
    lines = (line for line in f if line.strip() and not line.startswith("#"))
    for n, row in enumerate(csv.reader(lines, skipinitialspace=True), 1):
      if len(row) != 4:
        raise ValueError(f"{path}: data row {n} has {len(row)} fields, expected "
                         "YTID, start_seconds, end_seconds, \"positive_labels\"")
      segments[row[0].strip()] = [m.strip() for m in row[3].split(",") if m.strip()]
  return segments


def list_audio_files(audio_dir: str) -> tuple[list[str], list[tuple[str, str]]]:
  """Relative paths (POSIX separators, sorted) of the audio files under `audio_dir`.

  Directory links are followed; a directory reached a second time (a link loop, or two links to
  one folder) is not read again but returned with the reason, as `(relative path, reason)`.
  """
  found, skipped = [], []
  seen = {}  # real path -> the relative path it was first read under
  for root, dirs, files in os.walk(audio_dir, followlinks=True):
    rel_root = os.path.relpath(root, audio_dir).replace(os.sep, "/")
    seen.setdefault(os.path.realpath(root), rel_root)
    kept = []
    for d in sorted(dirs):
      if d.startswith("."):
        continue
      rel = d if rel_root == "." else f"{rel_root}/{d}"
      first = seen.setdefault(os.path.realpath(os.path.join(root, d)), rel)
      if first != rel:
        skipped.append((rel + "/", f"directory link to {first}/, which is already read"))
      else:
        kept.append(d)
    dirs[:] = kept
    for name in files:
      if not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS:
        found.append(os.path.relpath(os.path.join(root, name), audio_dir).replace(os.sep, "/"))
  return sorted(found), sorted(skipped)


def _ytid_candidates(stem: str) -> list[str]:
  bare = stem[1:] if stem.startswith("Y") else stem
  return [stem, bare, stem[:_YTID_LENGTH], bare[:_YTID_LENGTH]]


def _held_out(files: list[str], fraction: float) -> set[str]:
  if len(files) < 2 or fraction == 0:
    return set()
  ranked = sorted(files, key=lambda f: hashlib.sha1(f.encode()).hexdigest())
  return set(ranked[:max(1, round(fraction * len(files)))])


def list_clips(sources: Sources) -> Listing:
  """Matches the audio files to records (ids, splits, labels) without decoding them."""
  files, skipped_dirs = list_audio_files(sources.audio_dir)
  skipped = []
  clips = collections.defaultdict(list)
  missing = 0
  if not sources.segments_csvs:
    held_out = _held_out(files, sources.eval_fraction)
    splits = ("eval", "train") if held_out else ("train",)
    for rel in files:
      split = "eval" if rel in held_out else "train"
      clips[split].append(Clip(os.path.join(sources.audio_dir, rel), rel, rel, split))
  else:
    mids, _ = read_label_index(sources.labels_csv)
    index = {mid: i for i, mid in enumerate(mids)}
    rows = {}  # YTID -> (split, mids); the first CSV listing a YTID wins
    splits = tuple(sorted({split for split, _ in sources.segments_csvs}))
    for split, path in sources.segments_csvs:
      for ytid, labels in read_segments(path).items():
        rows.setdefault(ytid, (split, labels))
    used = set()  # YTIDs matched by a file, written or not
    for rel in files:
      stem = os.path.splitext(os.path.basename(rel))[0]
      ytid = next((c for c in _ytid_candidates(stem) if c in rows), None)
      if ytid is None:
        skipped.append((rel, None, "no row for this file in the segments CSVs"))
        continue
      if ytid in used:
        skipped.append((rel, rows[ytid][0],
                        f"duplicate: another file already provides YTID {ytid}"))
        continue
      used.add(ytid)
      split, labels = rows[ytid]
      unknown = [m for m in labels if m not in index]
      if unknown:
        skipped.append((rel, split, f"unknown label id {', '.join(unknown)}: not in "
                                    f"{os.path.basename(sources.labels_csv)}"))
        continue
      clips[split].append(Clip(os.path.join(sources.audio_dir, rel), rel, ytid, split,
                               tuple(sorted(index[m] for m in labels))))
    missing = len(rows) - len(used)
  return Listing(clips={s: sorted(c, key=lambda c: c.id) for s, c in sorted(clips.items())},
                 skipped=skipped, num_files=len(files), skipped_dirs=skipped_dirs,
                 missing=missing, splits=splits)


def encode_clip(clip: Clip, min_duration_s: float = DEFAULT_MIN_DURATION_S) -> Encoded:
  """Decodes one file into a record: float16 log-mel `(frames, mel)`, its float32 mean and std
  (`audio.moments` of the float16 values), id, duration, labels.

  Never raises for bad audio: the outcome carries the reason instead, so one file cannot stop
  a build.
  """
  try:
    conversions = tuple(audio.audio_info(clip.path).conversions())
    stream = audio.LogMelStream()
    parts = [stream.update(block).astype(np.float16) for block in audio.iter_audio(clip.path)]
    duration_s = stream.num_samples / audio.features.SAMPLE_RATE
    if duration_s < min_duration_s:
      return Encoded(clip, reason=f"too short: {duration_s:.3f} s < min_duration_s "
                                  f"{min_duration_s} s")
    parts.append(stream.finish().astype(np.float16))
  except (audio.AudioError, ValueError) as e:
    return Encoded(clip, reason=str(e).replace(clip.path + ": ", ""))
  # C order, as the record stores it: the moments depend on the summation order.
  spectrogram = np.ascontiguousarray(np.concatenate(parts))
  if not np.isfinite(spectrogram).all():
    # Finite samples can still overflow the float32 power spectrum (corrupt float files hold
    # values like 1e20); such a record would turn the training loss into NaN.
    peak = max(float(np.abs(block).max()) for block in audio.iter_audio(clip.path))
    return Encoded(clip, reason=f"non-finite log-mel: samples of magnitude {peak:.3g} overflow "
                                "the float32 power spectrum (expected audio in [-1, 1])")
  mean, std = audio.moments(spectrogram)
  example = {"spectrogram": spectrogram, "mean": mean.reshape(()), "std": std.reshape(()),
             "id": clip.id, "duration": np.float32(duration_s), "labels": list(clip.labels)}
  return Encoded(clip, example=example, conversions=conversions)
