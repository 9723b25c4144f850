r"""Builds log-mel shards (TFDS ArrayRecord) from a folder of audio files.

A plain folder (no labels; a deterministic 10% held out as 'eval'):
  python -m audiomaepp.tools.prepare_dataset --audio_dir=DIR --output_dir=OUT

AudioSet layout (labels from the segment CSVs; splits from the CSV names or SPLIT=PATH):
  python -m audiomaepp.tools.prepare_dataset --audio_dir=DIR --output_dir=OUT \
    --segments_csv=balanced_train_segments.csv,unbalanced_train_segments.csv,eval_segments.csv \
    --labels_csv=class_labels_indices.csv --num_workers=16

Train on it with `config.data.source = 'tfds'` and `config.data.data_dir = OUT`. Bad files are
skipped and listed in OUT/audio_logmel/<version>/report.json. At cluster scale, pass
`--beam_pipeline_options` (see docs/data.md).
"""
import os

from absl import flags
import tensorflow_datasets as tfds

from audiomaepp.data import builders
from audiomaepp.data import sources
from audiomaepp.errors import UserError
from audiomaepp.tools import cli

_AUDIO_DIR = flags.DEFINE_string("audio_dir", None, "Folder of audio files (searched recursively).",
                                 required=True)
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
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", None, "Run with Apache Beam: comma-separated pipeline options, "
    "e.g. 'runner=DirectRunner,direct_num_workers=8,direct_running_mode=multi_processing'.")


def _beam_options(value: str):
  beam = tfds.core.lazy_imports.apache_beam
  return beam.options.pipeline_options.PipelineOptions(
      flags=[f"--{option}" for option in value.split(",") if option])


def main(argv):
  del argv
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
  if os.path.exists(builders.dataset_dir(_OUTPUT_DIR.value)) and not _OVERWRITE.value:
    print("reusing the existing build (--overwrite rebuilds it)")
  builder, report = builders.build(
      inputs, _OUTPUT_DIR.value, num_workers=_NUM_WORKERS.value, overwrite=_OVERWRITE.value,
      beam_options=_beam_options(_BEAM_OPTIONS.value) if _BEAM_OPTIONS.value else None)
  print(f"dataset: {builder.data_path}")
  print(summary(report))
  print(f"report: {os.path.join(builder.data_path, builders.REPORT_FILE)}")


def _duration(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def summary(report: dict, max_listed: int = 10) -> str:
  """Human-readable counts, conversions and the first skipped files of a build report."""
  splits = ", ".join(f"{s}: {n}" for s, n in report["written_per_split"].items())
  if report["total_duration_s"] is not None:
    splits += f"; {_duration(report['total_duration_s'])} of audio"
  lines = [f"seen {report['seen']}  written {report['written']}  skipped {report['skipped']}  "
           f"({splits})"]
  lines += [f"  {kind}: {count} files" for kind, count in (report["conversions"] or {}).items()]
  if report["segments_without_file"]:
    lines.append(f"  {report['segments_without_file']} CSV segments have no audio file")
  skipped = report["skipped_files"]
  lines += [f"  skipped {s['file']}: {s['reason']}" for s in skipped[:max_listed]]
  if len(skipped) > max_listed:
    lines.append(f"  ... and {len(skipped) - max_listed} more")
  if "note" in report:
    lines.append(f"  note: {report['note']}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main)
