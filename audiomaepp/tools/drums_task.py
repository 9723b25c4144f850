"""Writes the drums task (HEAR layout) from the drum kits of Debian's `hydrogen-drumkits`.

    python -m audiomaepp.tools.drums_task --output_dir=tasks [--seed=0]

Leaves `tasks/drums-v1` (task_metadata.json, labelvocabulary.csv, <split>.json, 16000/<split>/)
for `tools.embed` and `tools.evaluate`: five drum classes, whole kits disjoint across splits
(`audiomaepp.evaluation.drums`). Needs the package (`make deps-real` or
`apt-get install -y hydrogen-drumkits`).
"""
from absl import flags

from audiomaepp.errors import UserError
from audiomaepp.evaluation import drums
from audiomaepp.evaluation import tasks
from audiomaepp.tools import cli

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the task folder drums-v1 goes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kits' split into train / valid / test.")
_KITS_DIR = flags.DEFINE_string("kits_dir", drums.KITS_DIR, "Hydrogen drum kits (one folder "
                                "with drumkit.xml per kit).")


def main(argv):
  del argv
  if not _OUTPUT_DIR.value:
    raise UserError("--output_dir is required")
  task_dir = drums.write_task(_OUTPUT_DIR.value, seed=_SEED.value, kits_dir=_KITS_DIR.value)
  task = tasks.read_hear_task(task_dir)
  print(f"wrote {task_dir}: " + ", ".join(f"{s} {len(task.splits[s].files)} clips"
                                          for s in drums.SPLITS))


if __name__ == "__main__":
  cli.run(main)
