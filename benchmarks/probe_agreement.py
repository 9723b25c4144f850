r"""How often a small in-training probe orders the study's encoders as the HEAR protocol does.

    python benchmarks/probe_agreement.py --workdir=workdirs/study [--clips=48,64,96] [--draws=8]

Reads a finished `benchmarks/study.py` workdir: each row's embeddings of every task
(WORKDIR/embeddings) and the protocol's scores (WORKDIR/scores). For each task and number of
clips, it draws random class-balanced subsets of each split (in the splits' proportion, as
`config.probe.max_clips` takes them) and scores every row three ways:

- `probes.probe_score`, the in-training probe: every clip scored by ridge classifiers fit on the
  other splits;
- the same ridge classifier fit on train + valid, scored on the test split only;
- a logistic regression fit on train + valid, scored on the test split only.

Of the pairs of rows the protocol separates (means further apart than the sum of their 95% CI
half-widths), it prints the share each probe orders as the protocol does, per task and pooled
over tasks (mean over draws). Subsets are drawn from the whole-clip scene embeddings the protocol
scored; the in-training probe embeds the first encoder input of each clip instead.
"""
import json
import pathlib

from absl import app
from absl import flags
import numpy as np

import common
import study
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.train import probes

_CLIPS = flags.DEFINE_list("clips", ["48", "64", "96"], "Clips per task of the probe.")
_DRAWS = flags.DEFINE_integer("draws", 8, "Random subsets per task and number of clips.")

PROBES = ("every clip, ridge (the in-training probe)", "test split, ridge",
          "test split, logistic regression")


def draw(labels: dict, clips: int, rng: np.random.Generator) -> dict:
  """Split -> indices of a random class-balanced subset, the splits in their proportion."""
  total = sum(len(rows) for rows in labels.values())
  keep = {}
  for split, rows in labels.items():
    order = rng.permutation(len(rows))
    shuffled = probes.balanced_subset([rows[i] for i in order],
                                      max(1, round(clips * len(rows) / total)))
    keep[split] = order[shuffled]
  return keep


def scores(task: tasks_lib.TaskEmbeddings, keep: dict) -> list[float]:
  """The three probes' scores (%) of one row on the subset `keep`."""
  from sklearn import linear_model  # pylint: disable=import-outside-toplevel
  from sklearn import pipeline  # pylint: disable=import-outside-toplevel
  from sklearn import preprocessing  # pylint: disable=import-outside-toplevel
  splits = list(keep)
  x = np.concatenate([task.splits[s].embeddings[keep[s]] for s in splits])
  y = np.concatenate([task.targets([s])[keep[s]].argmax(1) for s in splits])
  folds = np.repeat(np.arange(len(splits)), [len(keep[s]) for s in splits])
  test = folds == splits.index("test")
  out = [probes.probe_score(x, y, folds)]
  logistic = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                    linear_model.LogisticRegression(max_iter=3000))
  for model in (probes.ridge_classifier(), logistic):
    out.append(100 * float((model.fit(x[~test], y[~test]).predict(x[test]) == y[test]).mean()))
  return out


def main(argv):
  del argv
  workdir = pathlib.Path(flags.FLAGS.workdir)  # benchmarks/study.py's flag
  rows = list(study.ROWS)
  slugs = {row: common.slug(row) for row in rows}
  names = sorted(p.name for p in (workdir / "embeddings" / slugs[rows[0]]).iterdir())
  pooled = {(int(c), p): [0.0, 0] for c in _CLIPS.value for p in PROBES}
  print("| task | clips | separated pairs | " + " | ".join(PROBES) + " |")
  print("|---|---|---|" + "---|" * len(PROBES))
  for name in names:
    results = {row: {name: json.loads(next((workdir / "scores" / slugs[row]).glob(
        f"{name}-*seeds-*.json")).read_text())} for row in rows}
    pairs = study.separated_pairs(results, rows, name)
    protocol = {row: results[row][name]["mean"] for row in rows}
    tasks = {row: tasks_lib.read_task_embeddings(workdir / "embeddings" / slugs[row] / name)
             for row in rows}
    labels = {s: tasks[rows[0]].splits[s].labels
              for s in probes.probe_splits(tasks[rows[0]].metadata)}
    for clips in map(int, _CLIPS.value):
      shares = np.zeros(len(PROBES))
      for d in range(_DRAWS.value):
        keep = draw(labels, clips, np.random.default_rng([clips, d]))
        by_row = {row: scores(tasks[row], keep) for row in rows}
        for i in range(len(PROBES)):
          agree = study.concordant(pairs, protocol, {r: s[i] for r, s in by_row.items()})
          shares[i] += agree / max(1, len(pairs)) / _DRAWS.value
      for i, p in enumerate(PROBES):
        pooled[clips, p][0] += shares[i] * len(pairs)
        pooled[clips, p][1] += len(pairs)
      print(f"| {name} | {clips} | {len(pairs)} | " +
            " | ".join(f"{100 * s:.0f}%" for s in shares) + " |", flush=True)
  for clips in map(int, _CLIPS.value):
    agree, count = zip(*(pooled[clips, p] for p in PROBES))
    print(f"| all | {clips} | {count[0]} | " +
          " | ".join(f"{100 * a / max(1, c):.0f}%" for a, c in zip(agree, count)) + " |")


if __name__ == "__main__":
  app.run(main)
