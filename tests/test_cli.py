"""Every command line reports a user's mistake as one `error:` line and exit status 1.

Flag mistakes are checked in-process on `cli.parse_flags`; then each CLI runs once with a mistake
(all concurrently: each spends its seconds importing JAX): stderr must end with the expected
`error:` line, hold no other `error:` line and no traceback. Orbax's logging is hidden unless
--verbosity is given.
"""
import logging as py_logging
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest
import soundfile as sf

from audiomaepp import checkpointing
from audiomaepp import errors
from audiomaepp import models
from audiomaepp import original
from audiomaepp.evaluation import tasks
from audiomaepp.tools import cli
import faults

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]")
FIXTURES = REPO / "tests" / "fixtures"
MICRO = (f"--weights={FIXTURES / 'maepp_micro_weights.npz'}",
         f"--original_args={FIXTURES / 'maepp_micro_config.json'}")


def write_embeddings(out: pathlib.Path, poison: dict) -> None:
  """A small HEAR-style embedding folder `out/task-v1`; `poison` = {split: (row, value)}."""
  rng = np.random.default_rng(0)
  metadata = {"splits": ["train", "valid", "test"], "embedding_type": "scene",
              "prediction_type": "multiclass"}
  splits = {s: (rng.normal(size=(6, 8)).astype(np.float32), [["a"], ["b"]] * 3,
                [f"{s}_{i}.wav" for i in range(6)]) for s in metadata["splits"]}
  tasks.write_task_embeddings(out, "task-v1", metadata, ["a", "b"], splits)
  for split, (row, value) in poison.items():
    path = out / "task-v1" / f"{split}.embeddings.npy"
    embeddings = np.load(path)
    embeddings[row, 2] = value
    np.save(path, embeddings)


def _cases(tmp: pathlib.Path) -> dict:
  """{case: (command after the interpreter, the line stderr must end with)}: one per CLI."""
  nan_dir = tmp / "nan_embeddings"
  tool = lambda name: ["-m", f"audiomaepp.tools.{name}"]
  return {
      "main_misspelled_config_field": (
          ["main.py", "--config=configs/demo.py", f"--workdir={tmp / 'workdir'}",
           "--config.num_train_step=5"],
          "error: --config.num_train_step: the config has no field 'num_train_step'; did you "
          "mean --config.num_train_steps?"),
      "summary_bad_model_field": (
          [*tool("summary"), "--config=configs/demo.py", "--config.model.num_heads=5"],
          "error: config.model.num_heads=5 must be positive and divide config.model.width=128"),
      "embed_not_a_workdir": (
          [*tool("embed"), f"--checkpoint={tmp / 'nowhere'}", "--audio=x.wav",
           f"--output_dir={tmp / 'out'}"],
          f"error: {tmp / 'nowhere' / 'config.json'} not found: {tmp / 'nowhere'} is not a "
          "workdir"),
      "embed_short_clip": (
          [*tool("embed"), f"--checkpoint={tmp / 'imported'}", f"--audio={tmp / 'short.wav'}",
           f"--output_dir={tmp / 'out'}"],
          f"error: {tmp / 'short.wav'}: audio too short: 100 samples per sound, the log-mel needs "
          "at least 201"),
      "evaluate_nan_embedding": (
          [*tool("evaluate"), f"--embeddings_dir={nan_dir}", "--seeds=1", "--max_epochs=3"],
          f"error: {nan_dir / 'task-v1' / 'train.embeddings.npy'}: split 'train' row 3 "
          "(train_3.wav) holds NaN or infinite values (1 such rows)"),
      "import_missing_weights": (
          [*tool("import_original"), f"--weights={tmp / 'none.npz'}", MICRO[1],
           f"--output_dir={tmp / 'not_imported'}"],
          f"error: {tmp / 'none.npz'}"),
      "prepare_missing_audio_dir": (
          [*tool("prepare_dataset"), f"--audio_dir={tmp / 'nowhere'}",
           f"--output_dir={tmp / 'out'}"],
          f"error: audio_dir '{tmp / 'nowhere'}' is not a directory"),
  }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(tmp, {case: (returncode, stderr)}) for every case, all run at once."""
  tmp = tmp_path_factory.mktemp("cli")
  write_embeddings(tmp / "nan_embeddings", {"train": (3, np.nan)})
  original.import_to_workdir(MICRO[0].split("=", 1)[1], str(tmp / "imported"),
                             original_args=MICRO[1].split("=", 1)[1])
  sf.write(tmp / "short.wav", np.zeros(100, np.float32), 16000)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = {case: subprocess.Popen([sys.executable, *command], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for case, (command, _) in _cases(tmp).items()}
  results = {}
  for case, proc in procs.items():
    _, stderr = proc.communicate(timeout=500)
    results[case] = (proc.returncode, stderr)
  return tmp, results


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(_cases(pathlib.Path("/t"))))
def test_every_cli_reports_a_mistake_in_one_line(runs, case):
  tmp, results = runs
  returncode, stderr = results[case]
  lines = stderr.strip().splitlines()
  assert returncode == 1, stderr[-3000:]
  assert lines[-1].startswith(_cases(tmp)[case][1]), lines[-1]
  assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
  assert "Traceback" not in stderr


def _parse_error(capfd, *args: str) -> str:
  """The stderr of `cli.parse_flags` on `args` with a --config file flag and an integer flag;
  it must exit with status 1."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_integer("seeds", 10, "seeds", flag_values=flag_values)
  with pytest.raises(SystemExit) as stop:
    cli.parse_flags(argv, flag_values)
  assert stop.value.code == 1
  return capfd.readouterr().err


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/demo.py", "--config.num_train_step=5"],
     "error: --config.num_train_step: the config has no field 'num_train_step'; did you mean "
     "--config.num_train_steps?"),
    (["--config=configs/demo.py", "--config.model.widht=64"],
     "error: --config.model.widht: the config has no field 'widht'; did you mean "
     "--config.model.width?"),
    (["--config=configs/no_such.py"], "error: --config=configs/no_such.py: config file not found"),
    (["--config=configs/no_such.py", "--config.seed=1"],
     "error: --config=configs/no_such.py: config file not found"),
    (["--config=configs/demo.py", "--num_train_steps=5"],
     "error: Unknown command line flag 'num_train_steps'"),
    (["--config=configs/demo.py", "--config.model.depth=two"],
     "error: flag --config.model.depth=two: invalid literal for int() with base 10: 'two'"),
    (["--seeds=many"], "error: flag --seeds=many: invalid literal for int() with base 10: 'many'"),
])
def test_flag_mistakes_are_one_line(capfd, monkeypatch, args, expected):
  monkeypatch.chdir(REPO)
  assert _parse_error(capfd, *args).strip() == expected


def test_user_error_in_main_exits_1_with_one_line(capfd):
  def main(argv):
    del argv
    raise errors.UserError("config.x=1: expected 2")
  with pytest.raises(SystemExit) as stop:
    cli._run_main(main, ["prog"])
  assert stop.value.code == 1
  assert capfd.readouterr().err.strip() == "error: config.x=1: expected 2"


def test_os_error_names_the_path(tmp_path, capfd):
  missing = tmp_path / "missing.json"
  with pytest.raises(SystemExit):
    cli._run_main(lambda argv: open(missing), ["prog"])
  assert capfd.readouterr().err.strip() == f"error: {missing}: No such file or directory"


def test_internal_error_keeps_its_traceback():
  def main(argv):
    raise KeyError("a bug")  # not a user mistake: must propagate unchanged
  with pytest.raises(KeyError, match="a bug"):
    cli._run_main(main, ["prog"])


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=400)


def _foreign_log_lines(stderr: str) -> list[str]:
  """absl log lines ('I1202 01:16:02.549764 1397805 file.py:126] ...') logged from files that
  are not the package's own (Orbax's)."""
  ours = {path.name for path in (REPO / "audiomaepp").rglob("*.py")}
  return [line for line in stderr.splitlines()
          if (m := LOG_LINE.match(line)) and m.group(1) not in ours]


def test_library_logging_below_its_level_is_hidden_by_default():
  record = lambda path, level: py_logging.LogRecord("absl", level, path, 1, "m", None, None)
  site = "/venv/lib/python3.11/site-packages"
  assert not cli.quiet_libraries(record(f"{site}/jax/_src/xla_bridge.py", py_logging.INFO))
  assert cli.quiet_libraries(record(f"{site}/jax/_src/xla_bridge.py", py_logging.WARNING))
  assert not cli.quiet_libraries(record(f"{site}/orbax/checkpoint/a.py", py_logging.WARNING))
  assert cli.quiet_libraries(record(f"{site}/orbax/checkpoint/a.py", py_logging.ERROR))
  assert cli.quiet_libraries(record("/repo/audiomaepp/checkpointing.py", py_logging.INFO))


@pytest.mark.timeout(600)
def test_orbax_is_quiet_by_default(tmp_path):
  """An import (an Orbax save), then the embed tool on that workdir with a damaged newer step (a
  failed and a good restore through read-only managers): no Orbax line, no traceback."""
  workdir = tmp_path / "w"
  imported = _run("audiomaepp.tools.import_original", *MICRO, f"--output_dir={workdir}")
  assert imported.returncode == 0, imported.stderr
  assert _foreign_log_lines(imported.stderr) == [], imported.stderr
  assert len(imported.stderr.strip().splitlines()) <= 3, imported.stderr
  params = checkpointing.restore_params(str(workdir), models.abstract_params(
      models.build_model(checkpointing.load_config(str(workdir)).model)))
  checkpointing.save_params(str(workdir), params, step=5)
  faults.truncate_checkpoint_arrays(workdir / "checkpoints" / "5")
  clip = tmp_path / "clip.wav"
  sf.write(clip, faults.tone(1.0), 16000)
  embed = _run("audiomaepp.tools.embed", f"--checkpoint={workdir}", f"--audio={clip}",
               f"--output_dir={tmp_path / 'out'}")
  assert embed.returncode == 0, embed.stderr
  assert _foreign_log_lines(embed.stderr) == [], embed.stderr
  assert "Traceback" not in embed.stderr and "Event loop is closed" not in embed.stderr
  assert f"restored step 0 of {workdir} instead of the damaged newer steps [5]" in embed.stderr
  assert "320 values" in embed.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_verbosity_shows_orbax_logging(tmp_path):
  verbose = _run("audiomaepp.tools.import_original", *MICRO, f"--output_dir={tmp_path / 'w'}",
                 "--verbosity=0")
  assert verbose.returncode == 0, verbose.stderr
  assert len(_foreign_log_lines(verbose.stderr)) >= 20, verbose.stderr


def test_storage_that_does_not_answer_is_one_line(capfd):
  """A restore whose storage stays unreadable after its retries (embed, export, evaluate)."""
  def main(argv):
    del argv
    raise checkpointing.StorageError("checkpoint step 8 of gs://b/w could not be read after 4 "
                                     "attempts (UNAVAILABLE: connection reset)")
  with pytest.raises(SystemExit) as stop:
    cli._run_main(main, ["prog"])
  assert stop.value.code == 1
  assert capfd.readouterr().err.strip() == (
      "error: checkpoint step 8 of gs://b/w could not be read after 4 attempts (UNAVAILABLE: "
      "connection reset)")
