r"""Builds log-mel shards (TFDS ArrayRecord) from a folder of audio files.

A plain folder (no labels; a deterministic 10% held out as 'eval'):
  python -m audiomaepp.tools.prepare_dataset --audio_dir=DIR --output_dir=OUT

AudioSet layout (labels from the segment CSVs; splits from the CSV names or SPLIT=PATH):
  python -m audiomaepp.tools.prepare_dataset --audio_dir=DIR --output_dir=OUT \
    --segments_csv=balanced_train_segments.csv,unbalanced_train_segments.csv,eval_segments.csv \
    --labels_csv=class_labels_indices.csv --num_workers=16

Train on it with `config.data.source = 'tfds'` and `config.data.data_dir = OUT`. Bad files are
skipped and listed in OUT/audio_logmel/<version>/report.json. With --labels_csv, each split's
label index (`labels-<split>.npz`: record ids and class lists) is written beside the shards, so
fine-tuning reads labels without reading clips; run again on a build that lacks it (same flags),
prepare_dataset writes it from the records without encoding anything.

On many machines (docs/data.md): run each part, anywhere the folders are mounted, then merge:
  python -m audiomaepp.tools.prepare_dataset ... --num_parts=64 --part=I   # I = 0..63
  python -m audiomaepp.tools.prepare_dataset --output_dir=OUT --num_parts=64 --merge
"""
import os

from absl import flags
import tensorflow_datasets as tfds

from audiomaepp.data import builders
from audiomaepp.data import sources
from audiomaepp.errors import UserError
from audiomaepp.tools import cli

_AUDIO_DIR = flags.DEFINE_string("audio_dir", None,
                                 "Folder of audio files (searched recursively, links followed).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "TFDS data_dir to write the dataset into.",
                                  required=True)
_SEGMENTS_CSV = flags.DEFINE_list(
    "segments_csv", [], "AudioSet segment CSVs, each PATH (split 'eval' if the file name "
    "contains 'eval', else 'train') or SPLIT=PATH. Empty: plain folder without labels.")
_LABELS_CSV = flags.DEFINE_string("labels_csv", None,
                                  "AudioSet class_labels_indices.csv (with --segments_csv).")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", sources.DEFAULT_EVAL_FRACTION,
                                    "Plain folders: fraction of files held out as 'eval'.")
_MIN_DURATION_S = flags.DEFINE_float("min_duration_s", sources.DEFAULT_MIN_DURATION_S,
                                     "Clips shorter than this (seconds) are skipped.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Decoding processes (0: in this process).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset exists.")
_NUM_PARTS = flags.DEFINE_integer("num_parts", 1, "Split the build into this many parts "
                                  "(each built by its own process, on any machine).")
_PART = flags.DEFINE_integer("part", None, "With --num_parts: the part to build, 0..num_parts-1.")
_MERGE = flags.DEFINE_bool("merge", False, "With --num_parts: merge the built parts into the "
                           "dataset (needs only --output_dir).")


def main(argv):
  del argv
  if _MERGE.value:
    builder, report = builders.merge_parts(_OUTPUT_DIR.value, _NUM_PARTS.value)
    _print_result(builder.data_dir, report)
    return
  if _AUDIO_DIR.value is None:
    raise UserError("--audio_dir is required (except with --merge)")
  if (_NUM_PARTS.value > 1) != (_PART.value is not None):
    raise UserError("--part and --num_parts > 1 go together (then --merge once all are built)")
  part = (_PART.value or 0, _NUM_PARTS.value)
  try:
    inputs = sources.Sources(
        audio_dir=_AUDIO_DIR.value,
        segments_csvs=tuple(sources.parse_segments_arg(v) for v in _SEGMENTS_CSV.value),
        labels_csv=_LABELS_CSV.value,
        eval_fraction=_EVAL_FRACTION.value,
        min_duration_s=_MIN_DURATION_S.value)
  except ValueError as e:  # a flag value the inputs cannot use
    raise UserError(str(e)) from None
  tfds.disable_progress_bar()  # the builder shows one bar per split, with the skip count
  data_dir = _OUTPUT_DIR.value if part[1] == 1 else builders.part_dir(_OUTPUT_DIR.value, part)
  if os.path.exists(builders.dataset_dir(data_dir)) and not _OVERWRITE.value:
    print("reusing the existing build (--overwrite rebuilds it)")
  builder, report = builders.build(inputs, _OUTPUT_DIR.value, num_workers=_NUM_WORKERS.value,
                                   overwrite=_OVERWRITE.value, part=part)
  _print_result(builder.data_path, report)


def _print_result(path, report: dict) -> None:
  print(f"dataset: {path}")
  print(summary(report))
  print(f"report: {os.path.join(path, builders.REPORT_FILE)}")


def _duration(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def summary(report: dict, max_listed: int = 10) -> str:
  """Human-readable counts, conversions and the first skipped files of a build report."""
  splits = ", ".join(f"{s}: {n}" for s, n in report["written_per_split"].items())
  if report["total_duration_s"] is not None:
    splits += f"; {_duration(report['total_duration_s'])} of audio"
  lines = [f"seen {report['seen']}  written {report['written']}  skipped {report['skipped']}  "
           f"({splits})"]
  lines += [f"  {kind}: {count} files" for kind, count in report["conversions"].items()]
  if report["segments_without_file"]:
    lines.append(f"  {report['segments_without_file']} CSV segments have no audio file")
  skipped = report["skipped_files"]
  lines += [f"  skipped {s['file']}: {s['reason']}" for s in skipped[:max_listed]]
  if len(skipped) > max_listed:
    lines.append(f"  ... and {len(skipped) - max_listed} more")
  lines += [f"  skipped directory {d['directory']}: {d['reason']}"
            for d in report["skipped_directories"]]
  lines += [f"WARNING: {reason}; it was not written" for reason in report["empty_splits"].values()]
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main)
