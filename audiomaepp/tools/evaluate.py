r"""HEAR-style downstream evaluation of an embeddings directory (docs/reference.md#probe-protocol).

    python -m audiomaepp.tools.evaluate --embeddings_dir=OUT [--seeds=10] [--tasks=a,b] \
        [--order=shuffle|sorted|heareval] [--reference=paper] [--reference=other/scores.json] \
        [--output_dir=DIR] [--model_name=NAME]

OUT holds one folder per task, in this project's layout (`audiomaepp.tools.embed`) or
hear-eval-kit's (`tools.embed --layout=heareval`, or the kit's own embedding runner for any HEAR
model). Writes to the output directory (default OUT/evaluation): tasks/<task>.json per task (a
finished task is reused when the run is resumed with the same protocol and seeds), scores.json
(every score), results.md (a table like the paper's Table 2 with the normalised score) and
scores.png (bar chart).
"""
import json
import os
import pathlib
import time

from absl import flags
from absl import logging

from audiomaepp.errors import UserError
from audiomaepp.evaluation import heareval
from audiomaepp.evaluation import probe
from audiomaepp.evaluation import report
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.tools import cli

_EMBEDDINGS_DIR = flags.DEFINE_string(
    "embeddings_dir", None, "Directory with one embedding folder per task.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 10, "Number of random seeds (0..n-1) per grid point.")
_TASKS = flags.DEFINE_list("tasks", None, "Task folder names to evaluate (default: all).")
_REFERENCE = flags.DEFINE_multi_string(
    "reference", [], "Reference rows for the table and the normalised score: 'paper' (the "
    "paper's Table 2), a Table-2-style JSON or an earlier scores.json. Repeatable.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write the results (default: <embeddings_dir>/evaluation).")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "Row name of this model (default: the embeddings directory's name).")
_MAX_EPOCHS = flags.DEFINE_integer(
    "max_epochs", 500, "Epoch limit of each probe (500 in the paper; lower only for smoke runs).")
_STANDARDIZE = flags.DEFINE_bool(
    "standardize", False, "Standardise embeddings with train-split statistics (hear-eval-kit "
    "does not; off reproduces the paper's protocol).")
_ORDER = flags.DEFINE_enum(
    "order", "shuffle", heareval.ORDERS, "Training batch order: 'shuffle' (reshuffled every "
    "epoch), 'sorted' (file names, fixed) or 'heareval' (hear-eval-kit's: the fixed seed-0 "
    "permutation it stores when embedding, never reshuffled; the paper's numbers).")


def main(argv):
  del argv
  embeddings_dir = pathlib.Path(_EMBEDDINGS_DIR.value)
  output_dir = pathlib.Path(_OUTPUT_DIR.value or embeddings_dir / "evaluation")
  model_name = _MODEL_NAME.value or embeddings_dir.resolve().name
  if _SEEDS.value < 1:
    raise UserError("--seeds must be at least 1")
  config = probe.ProbeConfig(max_epochs=_MAX_EPOCHS.value, standardize=_STANDARDIZE.value,
                             shuffle=_ORDER.value == "shuffle")
  seeds = list(range(_SEEDS.value))
  references = [report.load_reference(spec) for spec in _REFERENCE.value]

  task_dirs = {d.name: d for d in tasks_lib.list_task_dirs(embeddings_dir)}
  names = _TASKS.value or sorted(task_dirs)
  unknown = [n for n in names if n not in task_dirs]
  if unknown:
    raise UserError(f"no complete task folders {unknown} in {embeddings_dir}; "
                         f"found {sorted(task_dirs)}")
  if not names:
    raise UserError(f"{embeddings_dir} holds no task folders (each needs task_metadata.json)")

  protocol = {**vars(config), "dropout_rates": list(config.dropout_rates), "order": _ORDER.value}
  (output_dir / "tasks").mkdir(parents=True, exist_ok=True)
  results = {}
  for i, name in enumerate(names):
    cache = output_dir / "tasks" / f"{name}.json"
    previous = _read_cached(cache)
    if previous and previous.get("protocol") == protocol and previous.get("seeds") == seeds:
      logging.info("[%d/%d] %s: reusing %s", i + 1, len(names), name, cache)
      results[name] = previous
      continue
    start = time.perf_counter()
    task = heareval.arrange(heareval.read_embeddings(task_dirs[name]), task_dirs[name],
                            _ORDER.value)
    logging.info("[%d/%d] %s: %s, %d classes, %d splits, %d seeds x %d grid points",
                 i + 1, len(names), name, task.metadata["prediction_type"], len(task.vocabulary),
                 len(task.splits), len(seeds), len(config.dropout_rates))
    result = probe.evaluate_task(task, seeds, config)
    results[name] = {**result.to_json(), "protocol": protocol}
    _write_json(cache, results[name])
    logging.info("[%d/%d] %s: %s %.2f ± %.2f in %.1f s", i + 1, len(names), name, result.metric,
                 result.mean, result.ci, time.perf_counter() - start)

  scores = report.build_report(model_name, results, references,
                               embeddings_dir=str(embeddings_dir), protocol=protocol)
  _write_json(output_dir / "scores.json", scores)
  markdown = report.results_markdown(scores)
  (output_dir / "results.md").write_text(markdown)
  report.bar_chart(scores, output_dir / "scores.png")
  logging.info("wrote %s, %s and %s", output_dir / "scores.json", output_dir / "results.md",
               output_dir / "scores.png")
  print(markdown)


def _read_cached(path: pathlib.Path):
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    logging.warning("%s is unreadable; evaluating the task again", path)
    return None


def _write_json(path: pathlib.Path, value) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  os.replace(tmp, path)


if __name__ == "__main__":
  cli.run(main)
