"""Evaluation reports: reference rows, scores.json, a table like the paper's Table 2, a chart.

Task keys are the embedding folder names (e.g. 'esc50-v2.0.0-full' or 'esc50'); a reference's
columns are matched to them through its aliases (HEAR folder name, HEAR task_name, short id).
All task scores are percentages.
"""
import dataclasses
import importlib.resources
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from audiomaepp.errors import UserError
from audiomaepp.evaluation import scores

PAPER_REFERENCE = "paper"  # `--reference=paper`: the paper's Table 2, shipped as package data


@dataclasses.dataclass(frozen=True)
class Reference:
  """Published or earlier results: model -> column -> (mean, ci or None).

  `aliases` maps the names a task may have in an embeddings directory (HEAR folder name, HEAR
  `task_name`, short id) to its column; `labels` gives each column's short label (e.g. 'BO').
  """
  rows: dict[str, dict[str, tuple[float, float | None]]]
  aliases: dict[str, str]
  labels: dict[str, str]
  source: str

  def column(self, task: str) -> str | None:
    """The column holding `task` (an embedding folder name), or None."""
    return self.aliases.get(task)


def paper_table2() -> dict[str, Any]:
  """The paper's Table 2 as shipped in audiomaepp/evaluation/data/paper_table2.json."""
  data = importlib.resources.files("audiomaepp.evaluation") / "data" / "paper_table2.json"
  return json.loads(data.read_text())


def load_reference(spec: str) -> Reference:
  """Reads reference rows from 'paper', a Table-2-style JSON or an earlier scores.json."""
  if spec == PAPER_REFERENCE:
    return _table_reference(paper_table2(), "paper Table 2")
  path = pathlib.Path(spec)
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path}: reference file not found (or use --reference=paper)") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if isinstance(data, dict) and "models" in data and "tasks" in data:
    return _table_reference(data, str(path))
  if isinstance(data, dict) and "model_name" in data and isinstance(data.get("tasks"), dict):
    row = {k: (float(v["mean"]), v.get("ci")) for k, v in data["tasks"].items()}
    return Reference({data["model_name"]: row}, {k: k for k in row}, data.get("labels", {}),
                     str(path))
  raise UserError(f"{path}: expected a Table-2-style JSON (keys 'tasks', 'models') or a "
                   "scores.json written by audiomaepp.tools.evaluate (keys 'model_name', 'tasks')")


def _table_reference(data: Mapping[str, Any], source: str) -> Reference:
  aliases, labels = {}, {}
  for task in data["tasks"]:
    for name in (task["id"], task.get("hear_task"), task.get("task_name")):
      if name:
        aliases[name] = task["id"]
    labels[task["id"]] = task["id"]
  rows = {}
  for model in data["models"]:
    rows[model["name"]] = {
        task_id: (float(v["mean"]), v.get("ci"))
        for task_id, v in model["scores"].items() if v is not None and v.get("mean") is not None}
  return Reference(rows, aliases, labels, source)


def build_report(model_name: str, task_results: Mapping[str, Mapping[str, Any]],
                 references: Sequence[Reference] = (), **extra: Any) -> dict[str, Any]:
  """The scores.json content: every task's results plus the normalised score over the pool.

  The pool is the evaluated model and every reference row; the score uses the evaluated tasks
  that every reference row has. A reference sharing no task with the evaluation is left out.
  """
  tasks = sorted(task_results)
  pool = {model_name: {t: task_results[t]["mean"] for t in tasks}}
  labels, rows, used = {}, {}, []
  for ref in references:
    columns = {t: ref.column(t) for t in task_results}
    shared = [t for t in tasks
              if columns[t] is not None and all(columns[t] in row for row in ref.rows.values())]
    if not shared:
      logging.warning("reference %s shares no task with %s; it is left out of the score",
                      ref.source, sorted(task_results))
      continue
    tasks = shared
    used.append(ref.source)
    labels.update({t: ref.labels.get(c, t) for t, c in columns.items() if c is not None})
    for name, row in ref.rows.items():
      if name in pool:  # e.g. a model evaluated again under its published name
        name = f"{name} ({ref.source})"
      values = {t: row[c] for t, c in columns.items() if c is not None and c in row}
      pool[name] = {t: v[0] for t, v in values.items()}
      rows[name] = {t: list(v) for t, v in values.items()}
  normalized = scores.normalized_scores(pool, tasks)
  return {
      **extra,
      "model_name": model_name,
      "tasks": dict(task_results),
      "normalized_score": {
          "tasks": tasks,
          "models": {m: _finite_or_none(v) for m, v in normalized.items()},
          "references": used,
      },
      "reference_rows": rows,
      "labels": {t: labels.get(t, t) for t in task_results},
  }


def results_markdown(report: Mapping[str, Any]) -> str:
  """A markdown table like the paper's Table 2 (mean±CI per task) with the normalised score."""
  tasks = sorted(report["tasks"])
  labels = report["labels"]
  score = report["normalized_score"]
  lines = [
      "| Model | " + " | ".join(labels[t] for t in tasks) + " | s(m) |",
      "|---|" + "---|" * (len(tasks) + 1),
  ]
  for name, row in report["reference_rows"].items():
    cells = [_cell(*row[t]) if t in row else "–" for t in tasks]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_number(score['models'][name])} |")
  model = report["model_name"]
  cells = [_cell(report["tasks"][t]["mean"], report["tasks"][t]["ci"]) for t in tasks]
  lines.append(f"| **{model}** | " + " | ".join(cells) + f" | {_number(score['models'][model])} |")
  n_models = len(score["models"])
  lines += [
      "",
      f"Scores: mean ± 95% CI over seeds (percent). s(m): aggregated normalised score over "
      f"{n_models} model(s) on {len(score['tasks'])} task(s)"
      + (f" ({', '.join(labels[t] for t in score['tasks'])})" if score["tasks"] else "")
      + "; n/a when undefined (a single model, or a task on which all models tie).",
      "",
      "| Task | Metric | Runs | Seeds | Dropout chosen (per seed) | Time (s) |",
      "|---|---|---|---|---|---|",
  ]
  for t in tasks:
    r = report["tasks"][t]
    lines.append(f"| {t} | {r['metric']} | {len(r['runs'])} | {len(r['seeds'])} | "
                 f"{', '.join(f'{p:g}' for p in r['grid_choice'])} | {r['wall_time_s']:.1f} |")
  return "\n".join(lines) + "\n"


def bar_chart(report: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes a PNG: the model's score per task with 95% CI, and the best reference per task."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  tasks = sorted(report["tasks"])
  means = [report["tasks"][t]["mean"] for t in tasks]
  cis = [report["tasks"][t]["ci"] or 0.0 for t in tasks]
  fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(tasks) + 3.5), 3.6))
  positions = range(len(tasks))
  ax.bar(positions, means, yerr=cis, capsize=4, color="tab:blue", label=report["model_name"])
  best = [max((row[t][0] for row in report["reference_rows"].values() if t in row), default=None)
          for t in tasks]
  if any(b is not None for b in best):
    ax.scatter([i for i, b in enumerate(best) if b is not None], [b for b in best if b is not None],
               marker="_", s=400, color="black", zorder=3, label="best reference")
  ax.set_xticks(list(positions), [report["labels"][t] for t in tasks], rotation=30, ha="right")
  ax.set_ylabel("score (%)")
  ax.set_ylim(0, 100)
  score = report["normalized_score"]["models"][report["model_name"]]
  ax.set_title(f"{report['model_name']}: s(m) = {_number(score)}")
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _cell(mean: float, ci: float | None) -> str:
  return f"{mean:.1f}±{ci:.1f}" if ci is not None else f"{mean:.1f}"


def _number(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.1f}"


def _finite_or_none(value: float) -> float | None:
  return None if math.isnan(value) else value
