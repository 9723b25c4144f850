"""TFDS builder of full-clip log-mel shards (ArrayRecord; no TensorFlow at build or read time).

Each record: `spectrogram` (frames, 80) float16, the unnormalised log-mel of the whole clip
(stored as raw bytes plus its shape), `mean` and `std` (float32, `audio.moments` of those
float16 values, so training standardises only its crop), `id` (YTID, or the path relative to
the audio folder), `duration` (seconds, after decoding at 16 kHz) and `labels` (class indices;
empty without labels). Splits 'train' and 'eval' as `audiomaepp.data.sources` assigns them.
Records are uncompressed (reading is a third of the cost of zstd's, for ~25 % more disk) and
written in TFDS's deterministic key-hash order, so the same inputs give identical shards.

Label index: a labelled build also writes, per split, `labels-<split>.npz` beside the shards: the
records' ids and class lists in record order (`LabelIndex`), so fine-tuning reads a split's labels
without reading its clips. A reused build that lacks it (built before it existed) gets it from
one pass over its records.

Bad inputs never stop a build: `report.json` next to the shards lists each skipped file with its
split and reason, counts the files seen, written and skipped, and the conversions applied
(resampling, downmixing). A split whose files were all skipped is not written: it is listed in
`empty_splits` with the reason, and only a build with nothing to write at all fails.

Many machines: part `i` of `n` (`build(..., part=(i, n))`, one process per part, on any machine
that sees the audio folder) encodes only the clips whose TFDS key hash falls in the i-th of n
equal hash ranges, into `<data_dir>/parts/<i>-of-<n>`; `merge_parts(data_dir, n)` then links
the parts' shards into one dataset. TFDS orders records by key hash, so the merged dataset holds
the records of a one-machine build, in the same order.
"""
import collections
from concurrent import futures
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Optional, Sequence

from absl import logging
from array_record.python import array_record_module
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing
from tensorflow_datasets.core import writer as writer_lib
from tensorflow_datasets.proto import tf_example_pb2
import tqdm

from audiomaepp.audio import features
from audiomaepp.data import sources as sources_lib
from audiomaepp.errors import UserError

NAME = "audio_logmel"
REPORT_FILE = "report.json"
PARTS_DIR = "parts"
_ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
_HASH_RANGE = 2**128  # TFDS key hashes are 128-bit MD5s
LABEL_INDEX_FILE = "labels-{split}.npz"


class _ArrayRecordWriter(writer_lib.ExampleWriter):
  """TFDS's ArrayRecord writer (one record per group), without compression."""

  def __init__(self):
    super().__init__(tfds.core.FileFormat.ARRAY_RECORD)

  def write(self, path: epath.PathLike, examples: Any) -> None:
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), _ARRAY_RECORD_OPTIONS)
    for _, serialized in examples:
      writer.write(serialized)
    writer.close()


class AudioLogmel(tfds.core.GeneratorBasedBuilder):
  """Full-clip float16 log-mels of a folder of audio files, with AudioSet labels when given."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Full-clip float16 log-mel (docs/reference.md#features), id, duration, labels.",
      "1.1.0": "Per-clip mean and std; uncompressed records (for fast crops).",
  }
  # TFDS finds a builder's source through the `importlib_resources` backport, which it only
  # requires (and pip only installs) on Python < 3.9; tell it directly.
  code_path = epath.Path(__file__)

  def __init__(self, *, sources: Optional[sources_lib.Sources] = None, num_workers: int = 0,
               part: tuple[int, int] = (0, 1), progress: bool = True, **kwargs: Any):
    """`sources` is needed to build, not to read an existing dataset; kwargs go to TFDS."""
    self._sources = sources
    self._num_workers = num_workers
    self._part = part
    self._progress = progress
    self._report = _Report()
    self._written = collections.defaultdict(list)  # split -> (id, labels) of its records
    self._executor = None
    super().__init__(**kwargs)

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
            "mean": tfds.features.Scalar(dtype=np.float32),
            "std": tfds.features.Scalar(dtype=np.float32),
            "id": tfds.features.Text(),
            "duration": tfds.features.Scalar(dtype=np.float32),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=names)),
        }),
        metadata=metadata,
    )

  def _example_writer(self) -> writer_lib.ExampleWriter:
    return _ArrayRecordWriter()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """One generator per split that has a record; the others go to the report, not to TFDS."""
    del dl_manager  # inputs are local files
    if self._sources is None:
      raise ValueError(f"{NAME}: building needs `sources` (the audio folder and CSVs)")
    listing = sources_lib.list_clips(self._sources)
    self._report.start(listing, with_listing=self._part[0] == 0)
    generators = {}
    for split in listing.splits:
      clips = [c for c in listing.clips.get(split, []) if in_part(split, c.id, self._part)]
      results = self._encode_and_report(split, clips)
      # Encode until the first record: TFDS cannot write an empty split, so one is left out.
      for result in results:
        if result.example is not None:
          generators[split] = itertools.chain([(result.clip.id, result.example)],
                                              self._generate_examples(results))
          break
    if not generators and self._part[1] == 1:
      raise UserError(f"no audio file under {self._sources.audio_dir} could be encoded: "
                      + "; ".join(self._report.empty_reason(split) for split in listing.splits))
    return generators

  def _generate_examples(
      self, results: Iterator[sources_lib.Encoded]) -> Iterator[tuple[str, dict]]:
    for result in results:
      if result.example is not None:
        yield result.clip.id, result.example

  def _encode_and_report(self, split: str,
                         clips: list[sources_lib.Clip]) -> Iterator[sources_lib.Encoded]:
    """`_encode_in_order`, each outcome added to the report, with a progress bar."""
    bar = tqdm.tqdm(self._encode_in_order(clips), total=len(clips), desc=f"{split:>5}",
                    unit="file", disable=not self._progress)
    for result in bar:
      self._report.add(split, result)
      if result.example is not None:
        self._written[split].append((result.clip.id, result.clip.labels))
      bar.set_postfix(skipped=len(self._report.skipped), refresh=False)
      yield result

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
    report = self._report.as_dict(sizes, part=self._part)
    for split, reason in report["empty_splits"].items():
      logging.warning("split %r is empty and was not written: %s", split, reason)
    if self._sources.labels_csv:
      for split in self.info.splits:
        write_label_index(os.fspath(self.data_path), split,
                          label_index(split, self._written[split]))
    (self.data_path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def in_part(split: str, key: str, part: tuple[int, int]) -> bool:
  """Whether record `key` of `split` belongs to part `part[0]` of `part[1]`: its TFDS key hash
  (MD5 salted with the split name, which orders the records) falls in that part's hash range."""
  index, count = part
  return hashing.Hasher(split).hash_key(key) * count // _HASH_RANGE == index


@dataclasses.dataclass(frozen=True)
class LabelIndex:
  """The labels of a split's records, in record order: `ids` (n,) bytes; record i's class indices
  are `classes[offsets[i]:offsets[i + 1]]` (`offsets` (n + 1,) int64, `classes` int32)."""
  ids: np.ndarray
  offsets: np.ndarray
  classes: np.ndarray


def label_index(split: str, records: Iterable[tuple[str, Sequence[int]]]) -> LabelIndex:
  """The index of `split`'s records, given as (id, class indices) in any order: ordered as TFDS
  writes them, by the key hash that `in_part` ranges over."""
  hasher = hashing.Hasher(split)
  ordered = sorted(records, key=lambda record: hasher.hash_key(record[0]))
  return _index([record_id.encode() for record_id, _ in ordered],
                [labels for _, labels in ordered])


def _index(ids: list[bytes], labels: list[Sequence[int]]) -> LabelIndex:
  """The index of records with `ids` and `labels`, in that order."""
  offsets = np.zeros(len(labels) + 1, np.int64)
  np.cumsum(np.fromiter(map(len, labels), np.int64, count=len(labels)), out=offsets[1:])
  classes = np.fromiter(itertools.chain.from_iterable(labels), np.int32, count=int(offsets[-1]))
  return LabelIndex(np.array(ids, dtype=np.bytes_), offsets, classes)


def _concatenate(indexes: Sequence[LabelIndex]) -> LabelIndex:
  """The index of the records of `indexes`, one after the other."""
  starts = np.cumsum([0] + [len(index.classes) for index in indexes])
  offsets = [index.offsets[1:] + start for index, start in zip(indexes, starts)]
  return LabelIndex(np.concatenate([index.ids for index in indexes]),
                    np.concatenate([np.zeros(1, np.int64)] + offsets),
                    np.concatenate([index.classes for index in indexes]))


def label_index_path(path: str, split: str) -> str:
  """Where the label index of `split` of the dataset in directory `path` is."""
  return os.path.join(path, LABEL_INDEX_FILE.format(split=split))


def write_label_index(path: str, split: str, index: LabelIndex) -> None:
  """Writes `index` beside the shards of the dataset in directory `path` (replaced atomically)."""
  target = label_index_path(path, split)
  staging = f"{target}.tmp-{os.getpid()}.npz"
  np.savez(staging, ids=index.ids, offsets=index.offsets, classes=index.classes)
  os.replace(staging, target)


def read_label_index(path: str, split: str) -> Optional[LabelIndex]:
  """The label index of `split` of the dataset in directory `path`; None when there is none."""
  try:
    with np.load(label_index_path(path, split), allow_pickle=False) as arrays:
      return LabelIndex(arrays["ids"], arrays["offsets"], arrays["classes"])
  except FileNotFoundError:
    return None


def label_index_from_records(source: Sequence[bytes], chunk: int = 1024) -> LabelIndex:
  """The index of serialized records (`source`: a split's data source of raw bytes, in record
  order), from one pass that reads only each record's id and labels."""
  ids, labels = [], []
  for start in range(0, len(source), chunk):
    for serialized in source.__getitems__(range(start, min(start + chunk, len(source)))):
      feature = tf_example_pb2.Example.FromString(serialized).features.feature
      ids.append(feature["id"].bytes_list.value[0])
      labels.append(list(feature["labels"].int64_list.value))  # not a view of the record
  return _index(ids, labels)


def write_missing_label_indexes(path: str) -> list[str]:
  """Writes the label index of every split of the labelled dataset in directory `path` that has
  none, from its records (`label_index_from_records`); returns those splits."""
  builder = tfds.builder_from_directory(path)
  if not builder.info.features["labels"].feature.names:
    return []
  missing = [split for split in builder.info.splits
             if not os.path.exists(label_index_path(path, split))]
  for split in missing:
    source = builder.as_data_source(split=split,
                                    deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    write_label_index(path, split, label_index_from_records(source))
  return missing


class _Report:
  """Counts and reasons collected while encoding; written as `report.json`."""

  def __init__(self):
    self.skipped = []
    self.conversions = collections.Counter()
    self.duration_s = 0.0
    self._listing = None

  def start(self, listing: sources_lib.Listing, with_listing: bool) -> None:
    """`with_listing`: report the files skipped at listing (every part lists; one reports)."""
    self._listing = listing
    self.skipped = [{"file": f, "split": s, "reason": r}
                    for f, s, r in (listing.skipped if with_listing else [])]

  def add(self, split: str, result: sources_lib.Encoded) -> None:
    if result.example is None:
      self.skipped.append({"file": result.clip.file, "split": split, "reason": result.reason})
      return
    self.duration_s += float(result.example["duration"])
    self.conversions.update(result.conversions)

  def empty_reason(self, split: str) -> str:
    return _empty_reason(split, self.skipped)

  def as_dict(self, written_per_split: dict[str, int], part: tuple[int, int]) -> dict:
    """The report; `written_per_split` from the finished dataset."""
    report = {
        "seen": self._listing.num_files,
        "written": sum(written_per_split.values()),
        "skipped": len(self.skipped),
        "splits": list(self._listing.splits),
        "written_per_split": dict(sorted(written_per_split.items())),
        "skipped_per_split": _skipped_per_split(self.skipped),
        "empty_splits": {},
        "total_duration_s": round(self.duration_s, 3),
        "segments_without_file": self._listing.missing,
        "conversions": dict(sorted(self.conversions.items())),
        "skipped_files": self.skipped,
        "skipped_directories": [{"directory": d, "reason": r}
                                for d, r in self._listing.skipped_dirs],
    }
    if part[1] > 1:
      report["part"] = list(part)
    else:
      report["empty_splits"] = _empty_splits(report)
    return report


def _skipped_per_split(skipped: list[dict]) -> dict[str, int]:
  counts = collections.Counter(s["split"] or "none" for s in skipped)
  return dict(sorted(counts.items()))


def _empty_reason(split: str, skipped: list[dict]) -> str:
  mine = [s for s in skipped if s["split"] == split]
  if not mine:
    return f"split {split!r}: no audio file was assigned to it"
  return (f"split {split!r}: all {len(mine)} of its files were skipped, e.g. "
          f"{mine[0]['file']}: {mine[0]['reason']}")


def _empty_splits(report: dict) -> dict[str, str]:
  return {split: _empty_reason(split, report["skipped_files"])
          for split in report["splits"] if split not in report["written_per_split"]}


def dataset_dir(data_dir: str) -> str:
  """Where `build` writes the dataset (shards, metadata, report) under the TFDS `data_dir`."""
  return os.path.join(data_dir, NAME, str(AudioLogmel.VERSION))


def part_dir(data_dir: str, part: tuple[int, int]) -> str:
  """The TFDS `data_dir` of part `part[0]` of `part[1]` of a build into `data_dir`."""
  return os.path.join(data_dir, PARTS_DIR, f"{part[0]}-of-{part[1]}")


def build(sources: sources_lib.Sources, data_dir: str, *, num_workers: int = 0,
          overwrite: bool = False, progress: bool = True,
          part: tuple[int, int] = (0, 1)) -> tuple[AudioLogmel, dict]:
  """Builds (or reuses) the dataset `data_dir/audio_logmel/<version>`; returns it and its report.

  An existing build is reused unless `overwrite` (a labelled one gets the label indexes it lacks).
  `part=(i, n)` with n > 1 builds only part i into `part_dir(data_dir, part)` (one shard per
  split); `merge_parts` assembles the parts.
  """
  index, count = part
  if not 0 <= index < count:
    raise UserError(f"part {index} of {count}: expected 0 <= part < num_parts")
  builder = AudioLogmel(sources=sources, num_workers=num_workers, part=part, progress=progress,
                        data_dir=data_dir if count == 1 else part_dir(data_dir, part),
                        file_format="array_record")
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # TFDS wants a download directory even when nothing is downloaded; keep it out of data_dir.
  with tempfile.TemporaryDirectory() as download_dir:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(
            download_mode=mode, try_download_gcs=False, num_shards=1 if count > 1 else None))
  if sources.labels_csv:
    for split in write_missing_label_indexes(os.fspath(builder.data_path)):
      logging.info("wrote the label index of split %r of the existing build", split)
  return builder, read_report(str(builder.data_path))


def merge_parts(data_dir: str, num_parts: int) -> tuple[tfds.core.DatasetBuilder, dict]:
  """Assembles the `num_parts` parts built into `data_dir` into one dataset; returns it and the
  merged report. Shards are hard-linked (copied across file systems), then `parts/` is removed.
  """
  parts = [os.path.join(part_dir(data_dir, (i, num_parts)), NAME, str(AudioLogmel.VERSION))
           for i in range(num_parts)]
  missing = [i for i, path in enumerate(parts)
             if not os.path.exists(os.path.join(path, REPORT_FILE))]
  if missing:
    raise UserError(f"{data_dir}: parts {missing} of {num_parts} are not built yet (run "
                    f"prepare_dataset with --part=N --num_parts={num_parts} for each)")
  target = dataset_dir(data_dir)
  if os.path.exists(target):
    raise UserError(f"{target} already exists: remove it to merge the parts again")
  infos = [tfds.builder_from_directory(path).info for path in parts]
  staging = f"{target}.merging"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  split_infos = []
  for split in sorted({s for info in infos for s in info.splits}):
    built = [(path, info.splits[split]) for path, info in zip(parts, infos)
             if split in info.splits]
    template = tfds.core.ShardedFileTemplate(data_dir=epath.Path(staging), dataset_name=NAME,
                                             split=split, filetype_suffix="array_record")
    for shard, (path, info) in enumerate(built):
      (source,) = info.filepaths
      _link_or_copy(os.fspath(source), os.fspath(template.sharded_filepath(
          shard_index=shard, num_shards=len(built))))
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[n for _, info in built for n in info.shard_lengths],
        num_bytes=sum(info.num_bytes for _, info in built), filename_template=template))
    indexes = [read_label_index(path, split) for path, _ in built]
    if all(index is not None for index in indexes):  # parts are consecutive key-hash ranges
      write_label_index(staging, split, _concatenate(indexes))
  info = infos[0]
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(staging)
  report = _merge_reports([read_report(path) for path in parts])
  with open(os.path.join(staging, REPORT_FILE), "w") as f:
    f.write(json.dumps(report, indent=2) + "\n")
  os.rename(staging, target)
  shutil.rmtree(os.path.join(data_dir, PARTS_DIR))
  write_missing_label_indexes(target)  # parts built without one
  return tfds.builder_from_directory(target), report


def _link_or_copy(source: str, target: str) -> None:
  try:
    os.link(source, target)
  except OSError:
    shutil.copyfile(source, target)


def _merge_reports(reports: list[dict]) -> dict:
  """One report from the parts' (part 0 holds the listing's counts and skips)."""
  first = reports[0]
  written = collections.Counter()
  conversions = collections.Counter()
  for report in reports:
    written.update(report["written_per_split"])
    conversions.update(report["conversions"])
  skipped = [s for report in reports for s in report["skipped_files"]]
  merged = {
      "seen": first["seen"],
      "written": sum(written.values()),
      "skipped": len(skipped),
      "splits": first["splits"],
      "written_per_split": dict(sorted(written.items())),
      "skipped_per_split": _skipped_per_split(skipped),
      "empty_splits": {},
      "total_duration_s": round(sum(r["total_duration_s"] for r in reports), 3),
      "segments_without_file": first["segments_without_file"],
      "conversions": dict(sorted(conversions.items())),
      "skipped_files": skipped,
      "skipped_directories": first["skipped_directories"],
      "parts": len(reports),
  }
  merged["empty_splits"] = _empty_splits(merged)
  return merged


def read_report(path: str) -> dict:
  """The `report.json` written next to the shards of a build in directory `path`."""
  with open(os.path.join(path, REPORT_FILE)) as f:
    return json.load(f)
