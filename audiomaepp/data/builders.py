"""TFDS builder of full-clip log-mel shards (ArrayRecord; no TensorFlow at build or read time).

Each record: `spectrogram` (frames, 80) float16, the unnormalised log-mel of the whole clip
(stored as raw bytes plus its shape), `id` (YTID, or the path relative to the audio folder),
`duration` (seconds, after decoding at 16 kHz) and `labels` (class indices; empty without
labels). Splits 'train' and 'eval' as `audiomaepp.data.sources` assigns them. Records are written
in TFDS's deterministic key-hash order, so the same inputs give identical shards.

Bad files never stop a build: `report.json` next to the shards lists each skipped file with its
reason and counts the files seen, written and skipped, and the conversions applied (resampling,
downmixing). With Apache Beam (`use_beam`, docs/data.md) files are encoded on the Beam workers,
which log the reasons for their skips instead.
"""
import collections
from concurrent import futures
import functools
import json
import multiprocessing
import os
import tempfile
from typing import Any, Iterator, Optional

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from audiomaepp.audio import features
from audiomaepp.data import sources as sources_lib

NAME = "audio_logmel"
REPORT_FILE = "report.json"


class AudioLogmel(tfds.core.GeneratorBasedBuilder):
  """Full-clip float16 log-mels of a folder of audio files, with AudioSet labels when given."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Full-clip float16 log-mel (SPEC §1), id, duration, labels."}
  # TFDS finds a builder's source through the `importlib_resources` backport, which it only
  # requires (and pip only installs) on Python < 3.9; tell it directly.
  code_path = epath.Path(__file__)

  def __init__(self, *, sources: Optional[sources_lib.Sources] = None, num_workers: int = 0,
               use_beam: bool = False, progress: bool = True, **kwargs: Any):
    """`sources` is needed to build, not to read an existing dataset; kwargs go to TFDS."""
    self._sources = sources
    self._num_workers = num_workers
    self._use_beam = use_beam
    self._progress = progress
    self._report = _Report()
    self._executor = None
    super().__init__(**kwargs)
    # Beam pickles builders through `_original_state`; keep the build arguments in it.
    self._original_state.update(sources=sources, num_workers=num_workers, use_beam=use_beam,
                                progress=progress)

  def _info(self) -> tfds.core.DatasetInfo:
    mids, names = None, None  # reading: ClassLabel restores its names from the dataset files
    if self._sources is not None:
      mids, names = [], []
      if self._sources.labels_csv:
        mids, names = sources_lib.read_label_index(self._sources.labels_csv)
    metadata = tfds.core.MetadataDict()
    if mids is not None:
      metadata["label_mids"] = mids
      metadata["min_duration_s"] = self._sources.min_duration_s
      metadata["eval_fraction"] = (None if self._sources.segments_csvs
                                   else self._sources.eval_fraction)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "spectrogram": tfds.features.Tensor(shape=(None, features.N_MELS), dtype=np.float16,
                                                encoding=tfds.features.Encoding.BYTES),
            "id": tfds.features.Text(),
            "duration": tfds.features.Scalar(dtype=np.float32),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=names)),
        }),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # inputs are local files
    if self._sources is None:
      raise ValueError(f"{NAME}: building needs `sources` (the audio folder and CSVs)")
    listing = sources_lib.list_clips(self._sources)
    self._report.start(listing)
    if not listing.clips:
      raise ValueError(f"no usable audio files under {self._sources.audio_dir} "
                       f"({listing.num_files} found, {len(listing.skipped)} skipped at listing: "
                       f"{listing.skipped[:3]})")
    return {split: self._generate_examples(split, clips)
            for split, clips in listing.clips.items()}

  def _generate_examples(self, split: str, clips: list[sources_lib.Clip]) -> Any:
    if self._use_beam:
      beam = tfds.core.lazy_imports.apache_beam
      return (beam.Create(clips)
              | beam.FlatMap(_encode_for_beam, min_duration_s=self._sources.min_duration_s))
    return self._encode_locally(split, clips)

  def _encode_locally(self, split: str,
                      clips: list[sources_lib.Clip]) -> Iterator[tuple[str, dict]]:
    written = 0
    bar = tqdm.tqdm(self._encode_in_order(clips), total=len(clips), desc=f"{split:>5}",
                    unit="file", disable=not self._progress)
    for result in bar:
      self._report.add(split, result)
      bar.set_postfix(skipped=self._report.num_skipped, refresh=False)
      if result.example is not None:
        written += 1
        yield result.clip.id, result.example
    if not written:
      reasons = [r for r in self._report.skipped if r["split"] == split][:3]
      raise ValueError(f"split {split!r}: none of its {len(clips)} files could be encoded, "
                       f"e.g. {reasons}")

  def _encode_in_order(self, clips: list[sources_lib.Clip]) -> Iterator[sources_lib.Encoded]:
    """`encode_clip` over `clips`, in order; in worker processes when `num_workers` > 0."""
    encode = functools.partial(sources_lib.encode_clip,
                               min_duration_s=self._sources.min_duration_s)
    if not self._num_workers:
      yield from map(encode, clips)
      return
    if self._executor is None:
      # Spawned, not forked: the caller may have started JAX, whose threads do not survive a
      # fork. An executor (unlike multiprocessing.Pool) fails instead of hanging when workers die.
      self._executor = futures.ProcessPoolExecutor(
          self._num_workers, mp_context=multiprocessing.get_context("spawn"))
    pending = collections.deque()  # bounded, so memory does not grow with the corpus
    for clip in clips:
      pending.append(self._executor.submit(encode, clip))
      if len(pending) >= 8 * self._num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()

  def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                            download_config: tfds.download.DownloadConfig) -> None:
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._executor is not None:
        self._executor.shutdown(cancel_futures=True)
        self._executor = None
    # `data_path` is still the incomplete directory here, renamed with the shards on success.
    sizes = {name: info.num_examples for name, info in self.info.splits.items()}
    (self.data_path / REPORT_FILE).write_text(
        json.dumps(self._report.as_dict(sizes, beam=self._use_beam), indent=2) + "\n")


def _encode_for_beam(clip: sources_lib.Clip, min_duration_s: float):
  beam = tfds.core.lazy_imports.apache_beam
  result = sources_lib.encode_clip(clip, min_duration_s)
  if result.example is None:
    beam.metrics.Metrics.counter(NAME, "skipped").inc()
    logging.warning("skipped %s: %s", clip.path, result.reason)
    return
  beam.metrics.Metrics.counter(NAME, "written").inc()
  yield clip.id, result.example


class _Report:
  """Counts and reasons collected while encoding; written as `report.json`."""

  def __init__(self):
    self.skipped = []
    self.conversions = collections.Counter()
    self.duration_s = 0.0
    self._listing = None

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def start(self, listing: sources_lib.Listing) -> None:
    self._listing = listing
    self.skipped = [{"file": f, "split": None, "reason": r} for f, r in listing.skipped]

  def add(self, split: str, result: sources_lib.Encoded) -> None:
    if result.example is None:
      self.skipped.append({"file": result.clip.file, "split": split, "reason": result.reason})
      return
    self.duration_s += float(result.example["duration"])
    self.conversions.update(result.conversions)

  def as_dict(self, written_per_split: dict[str, int], beam: bool) -> dict:
    """The report; `written_per_split` from the finished dataset (exact in either mode)."""
    written = sum(written_per_split.values())
    report = {
        "seen": self._listing.num_files,
        "written": written,
        "skipped": self._listing.num_files - written,
        "written_per_split": dict(sorted(written_per_split.items())),
        "total_duration_s": None if beam else round(self.duration_s, 3),
        "segments_without_file": self._listing.missing,
        "conversions": None if beam else dict(sorted(self.conversions.items())),
        "skipped_files": self.skipped,
    }
    if beam:
      report["note"] = ("built with Apache Beam: skipped_files lists only the files skipped "
                        "before decoding; the reasons for the others are in the Beam workers' "
                        f"logs (metric {NAME}/skipped)")
    return report


def dataset_dir(data_dir: str) -> str:
  """Where `build` writes the dataset (shards, metadata, report) under the TFDS `data_dir`."""
  return os.path.join(data_dir, NAME, str(AudioLogmel.VERSION))


def build(sources: sources_lib.Sources, data_dir: str, *, num_workers: int = 0,
          overwrite: bool = False, beam_options: Any = None,
          progress: bool = True) -> tuple[AudioLogmel, dict]:
  """Builds (or reuses) the dataset `data_dir/audio_logmel/<version>`; returns it and its report.

  An existing build is reused unless `overwrite`. `beam_options` (Beam `PipelineOptions`) runs
  the encoding as an Apache Beam pipeline instead of `num_workers` local processes.
  """
  builder = AudioLogmel(sources=sources, num_workers=num_workers,
                        use_beam=beam_options is not None, progress=progress,
                        data_dir=data_dir, file_format="array_record")
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # TFDS wants a download directory even when nothing is downloaded; keep it out of data_dir.
  with tempfile.TemporaryDirectory() as download_dir:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(
            download_mode=mode, beam_options=beam_options, try_download_gcs=False))
  return builder, read_report(str(builder.data_path))


def read_report(path: str) -> dict:
  """The `report.json` written next to the shards of a build in directory `path`."""
  with open(os.path.join(path, REPORT_FILE)) as f:
    return json.load(f)
