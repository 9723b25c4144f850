"""Smoke tests of the benchmark scripts: each runs at toy sizes on CPU and reports what it claims.

Timings are never asserted. The checks compare the reported numbers with independent references:
XLA's FLOP count of the compiled step against the analytic one, the HEAR API's chunking of 10-s
clips and embedding width, the arithmetic behind rates, MFU and the largest-batch estimate, and the
flags gpu_suite.sh passes against the flags each script defines.
"""
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

import pytest

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# One block each, width 32: compilation dominates, so the model is as small as the code allows.
MICRO = ["--config=configs/demo.py", "--config.model.depth=1", "--config.model.decoder_depth=1",
         "--config.model.width=32", "--config.model.num_heads=2",
         "--config.model.decoder_width=32", "--config.model.decoder_num_heads=2"]
GIB = 2 ** 30


class Runs:
  """The benchmark scripts started together (XLA compiles on one core each: the two CPU cores
  run both at once); `result(name)` waits for one and returns (stdout, JSON record)."""

  def __init__(self, tmp_path: pathlib.Path):
    self._tmp = tmp_path
    self._procs = {}

  def start(self, name: str, script: str, *args: str) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    output = self._tmp / f"{name}.json"
    # Files, not pipes: a process blocked on a full pipe would stall while another is awaited.
    with open(self._tmp / f"{name}.out", "w") as stdout, \
         open(self._tmp / f"{name}.err", "w") as stderr:
      self._procs[name] = subprocess.Popen(
          [sys.executable, str(BENCHMARKS / script), *args, f"--output={output}"], cwd=ROOT,
          env=env, stdout=stdout, stderr=stderr)

  def result(self, name: str) -> tuple[str, dict]:
    returncode = self._procs[name].wait(timeout=300)
    assert returncode == 0, (self._tmp / f"{name}.err").read_text()[-4000:]
    return ((self._tmp / f"{name}.out").read_text(),
            json.loads((self._tmp / f"{name}.json").read_text()))

  def stop(self) -> None:
    for proc in self._procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  runs = Runs(tmp_path_factory.mktemp("benchmarks"))
  runs.start("train_step", "train_step.py", *MICRO, "--batch_size=2,4", "--steps=2",
             "--windows=2", "--warmup=1", "--measure_peak", "--matmul_size=128", "--max_batch",
             "--memory_gb=1", "--batch_granule=8")
  runs.start("embed", "embed.py", *MICRO, "--clips=2", "--repeats=2")
  yield runs
  runs.stop()


def test_train_step_reports_consistent_flops_rates_and_memory(runs):
  stdout, record = runs.result("train_step")
  assert "| batch/device |" in stdout and "largest per-device batch: estimate" in stdout
  assert record["environment"]["platform"] == "cpu"
  assert record["peak"]["source"] == "measured float32 matmul"
  params = record["model"]["params"]
  for result, batch in zip(record["results"], (2, 4)):
    assert result["per_device_batch"] == batch == result["global_batch"]
    assert result["step_s"] == pytest.approx(statistics.median(result["step_s_windows"]))
    assert result["samples_per_s"] == pytest.approx(batch / result["step_s"])
    # XLA counts every op of the compiled step (norms, softmax, the optimiser); the analytic count
    # only matmuls and attention: they must agree to within a few tens of percent.
    assert 0.9 < result["xla_over_analytic"] < 1.4
    achieved = result["samples_per_s"] * result["analytic_flops_per_sample"]
    assert result["achieved_flops_per_device"] == pytest.approx(achieved)
    assert result["mfu"] == pytest.approx(achieved / record["peak"]["peak_flops"])
    # Parameters and both Adam moments (float32) are arguments of the step.
    assert result["planned_bytes"] >= 3 * 4 * params
    assert result["loss_finite"]
  # Activation memory grows with the batch.
  assert record["results"][1]["planned_bytes"] > record["results"][0]["planned_bytes"]
  best = record["max_batch"]
  assert best["budget_bytes"] == GIB and best["measured"] is None  # CPU: estimate only
  assert best["estimate"] % 8 == 0
  planned = lambda batch: best["fixed_bytes"] + best["bytes_per_sample"] * batch
  assert planned(best["estimate"]) <= GIB < planned(best["estimate"] + 8)


def test_embed_reports_clips_per_second_of_ten_second_clips(runs):
  stdout, record = runs.result("embed")
  assert "| clips/call |" in stdout
  (result,) = record["results"]
  # 10 s -> 1001 frames -> 6 chunks of 200; features 5 x width per frame (docs/reference.md).
  assert result["chunks_per_clip"] == 6
  assert result["chunks_encoded"] == 16  # 12 chunks, bucketed to a power of two
  assert result["embedding_shape"] == [2, 5 * 32] and result["embeddings_finite"]
  assert result["clips_per_s"] == pytest.approx(2 / result["call_s"])
  assert result["audio_s_per_s"] == pytest.approx(10 * result["clips_per_s"])
  assert result["compile_s"] == pytest.approx(max(0.0, result["first_call_s"] - result["call_s"]))


def _suite_commands(**env: str) -> dict[str, str]:
  """{section: command} that gpu_suite.sh prints in dry-run mode."""
  done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "run"], cwd=ROOT,
                        env={**os.environ, "SUITE_DRY_RUN": "1", **env},
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  return dict(re.findall(r"^== (\w+): (.*)$", done.stdout, flags=re.M))


def _defined_flags(script: pathlib.Path) -> set[str]:
  return set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", script.read_text()))


@pytest.mark.parametrize("smoke", ["0", "1"])
def test_gpu_suite_passes_only_defined_flags(smoke, tmp_path):
  commands = _suite_commands(SUITE_SMOKE=smoke, SUITE_OUT=str(tmp_path))
  assert {"base", "tiny", "large", "input_pipeline", "embed", "logmel"} <= commands.keys()
  for name, command in commands.items():
    (script,) = re.findall(r"benchmarks/\w+\.py", command)
    defined = _defined_flags(ROOT / script)
    for flag, value in re.findall(r"--([\w.]+)=(\S*)", command.split(script, 1)[1]):
      if flag.startswith("config."):
        assert "config" in defined, (name, flag)
      else:
        assert flag in defined, f"section {name}: {script} defines no --{flag}"
      if flag == "config":
        assert (ROOT / value).is_file(), (name, value)
  assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 7 minutes on an idle 2-core machine, twice that when shared
def test_gpu_suite_smoke_runs_every_section(tmp_path):
  done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "run"], cwd=ROOT,
                        env={**os.environ, "SUITE_SMOKE": "1", "SUITE_OUT": str(tmp_path),
                             "SUITE_BUDGET_S": "1200"},
                        capture_output=True, text=True, timeout=1500)
  assert done.returncode == 0, done.stderr[-4000:]
  suite = json.loads((tmp_path / "suite.json").read_text())
  assert {s["name"]: s["rc"] for s in suite["status"]} == {
      name: "0" for name in _suite_commands(SUITE_SMOKE="1")}
  parts = suite["sections"]["base"]["breakdown"]
  assert all(parts[k] > 0 for k in ("step_s", "loss_s", "loss_and_grad_s", "optimiser_s"))
  assert (tmp_path / "suite.log").read_text().count("== ") == len(suite["status"])


def test_vs_original_skips_with_a_reason_without_the_original(tmp_path):
  done = subprocess.run([sys.executable, str(BENCHMARKS / "vs_original.py"),
                         f"--original={tmp_path / 'absent'}"], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == (f"vs_original: skipped: the original's code is not at "
                                 f"{tmp_path / 'absent'} (--original=DIR)")
