r"""Scores a fine-tuned checkpoint on its data or a HEAR task folder, next to the frozen
encoder's probe.

    python -m audiomaepp.tools.evaluate_finetuned --workdir=runs/ft [--task_dir=DIR] \
        [--split=SPLIT] [--eval_crops=N] [--probe_seeds=0] [--max_epochs=500]

Prints a Markdown table: the fine-tuned classifier's score (top-1 % or mAP %) on the split, with
its best-validation checkpoint (`WORKDIR/best/`); with --probe_seeds=N also the HEAR probe
protocol of `tools.evaluate` (N seeds, mean ± 95% CI) on the embeddings of the encoder the run
started from (`init_from`), embedded into WORKDIR/probe_embeddings.
"""
import pathlib

from absl import flags

from audiomaepp import checkpointing
from audiomaepp import hear_api
from audiomaepp.errors import UserError
from audiomaepp.evaluation import embedding
from audiomaepp.evaluation import probe
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.tools import cli
from audiomaepp.train import finetune

_WORKDIR = flags.DEFINE_string("workdir", None, "A fine-tuning workdir.", required=True)
_TASK_DIR = flags.DEFINE_string("task_dir", None, "HEAR task folder (default: the data it was "
                                "trained on).")
_SPLIT = flags.DEFINE_string("split", None, "Split(s) to score (default: the run's test split or "
                             "fold).")
_EVAL_CROPS = flags.DEFINE_integer(
    "eval_crops", None, "Crops per clip, evenly spaced from its start to its end, their logits "
    "averaged (default: the run's config.data.eval_crops; 1: the centre crop).")
_PROBE_SEEDS = flags.DEFINE_integer(
    "probe_seeds", 0, "> 0: also run the HEAR probe on the frozen init_from encoder.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 500, "Epoch limit of each probe.")


def main(argv):
  del argv
  result = finetune.score_workdir(_WORKDIR.value, _TASK_DIR.value, _SPLIT.value,
                                  _EVAL_CROPS.value)
  metric = "mAP" if "mAP" in result else "top1_acc"
  crops = "centre crop" if result["eval_crops"] == 1 else f"{result['eval_crops']} crops a clip"
  rows = [(f"fine-tuned (step {result['step']}, {crops})", f"{100 * result['score']:.1f}")]
  if _PROBE_SEEDS.value > 0:
    config = checkpointing.load_config(_WORKDIR.value)
    if not config.get("init_from"):
      raise UserError(f"{_WORKDIR.value} was trained from random initialisation: there is no "
                      "pretrained encoder to probe")
    task_dir = _TASK_DIR.value or (config.data.task_dir if config.data.source == "hear" else None)
    if not task_dir:
      raise UserError("--probe_seeds: the HEAR probe needs a HEAR task folder; pass --task_dir")
    out = pathlib.Path(_WORKDIR.value) / "probe_embeddings"
    model = hear_api.load_model(config.init_from)
    embedding.embed_task(task_dir, embedding.model_embedder(model), str(out))
    task = tasks_lib.read_task_embeddings(out / result["task"])
    probed = probe.evaluate_task(task, list(range(_PROBE_SEEDS.value)),
                                 probe.ProbeConfig(max_epochs=_MAX_EPOCHS.value))
    rows.append((f"frozen {config.init_from} + HEAR probe ({_PROBE_SEEDS.value} seeds)",
                 f"{probed.mean:.1f} ± {probed.ci:.1f}"))
  print(f"| model | {result['task']} {result['split']} {metric} % |\n|---|---|")
  for name, value in rows:
    print(f"| {name} | {value} |")


if __name__ == "__main__":
  cli.run(main)
