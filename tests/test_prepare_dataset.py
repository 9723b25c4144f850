"""The prepare_dataset CLI end to end: counts printed, report written, a rerun reuses the build,
the label index of an AudioSet-layout build."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  done = subprocess.run([sys.executable, "-m", "audiomaepp.tools.prepare_dataset", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_cli_builds_prints_counts_and_reuses(tmp_path):
  audio_dir = tmp_path / "audio"
  (audio_dir / "sub").mkdir(parents=True)
  t = np.arange(16000) / 16000
  for i in range(4):
    sf.write(audio_dir / "sub" / f"tone{i}.wav", 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * t),
             16000)
  (audio_dir / "broken.wav").write_bytes(b"RIFF not really")
  out = tmp_path / "out"
  args = (f"--audio_dir={audio_dir}", f"--output_dir={out}", "--num_workers=0",
          "--eval_fraction=0.25")
  stdout = _run(*args)
  assert "seen 5  written 4  skipped 1  (eval: 1, train: 3; 4 s of audio)" in stdout
  assert "skipped broken.wav: undecodable" in stdout
  report_path = out / "audio_logmel" / "1.1.0" / "report.json"
  report = json.loads(report_path.read_text())
  assert (report["seen"], report["written"], report["skipped"]) == (5, 4, 1)
  assert f"report: {report_path}" in stdout
  shards = sorted(p.name for p in report_path.parent.glob("*.array_record*"))
  assert shards == ["audio_logmel-eval.array_record-00000-of-00001",
                    "audio_logmel-train.array_record-00000-of-00001"]
  summary = stdout[stdout.index("dataset: "):]
  again = _run(*args)  # the existing build is reused, with its report
  assert again.startswith("reusing the existing build") and again.endswith(summary)


@pytest.mark.slow  # three CLI processes (~25 s); test_data_builder checks the merged records
def test_cli_builds_parts_separately_then_merges_them(tmp_path):
  audio_dir = tmp_path / "audio"
  audio_dir.mkdir()
  t = np.arange(8000) / 16000
  for i in range(6):
    sf.write(audio_dir / f"tone{i}.wav", 0.3 * np.sin(2 * np.pi * 150 * (i + 1) * t), 16000)
  out = tmp_path / "out"
  common = (f"--audio_dir={audio_dir}", f"--output_dir={out}", "--num_workers=0",
            "--eval_fraction=0.2", "--num_parts=2")
  for part in range(2):  # as two machines would, each with its own --part
    assert f"parts/{part}-of-2" in _run(*common, f"--part={part}")
  stdout = _run(f"--output_dir={out}", "--num_parts=2", "--merge")
  assert "seen 6  written 6  skipped 0  (eval: 1, train: 5; 3 s of audio)" in stdout
  report = json.loads((out / "audio_logmel" / "1.1.0" / "report.json").read_text())
  assert report["parts"] == 2 and report["written_per_split"] == {"eval": 1, "train": 5}
  assert not (out / "parts").exists()


def test_cli_writes_a_label_index_of_the_csv_labels(tmp_path):
  audio_dir = tmp_path / "audio"
  audio_dir.mkdir()
  t = np.arange(8000) / 16000
  rng = np.random.default_rng(0)
  rows, expected = [], {}
  for i in range(8):
    ytid = f"yt{i:09d}"
    labels = sorted({int(c) for c in rng.integers(0, 4, size=1 + i % 3)})
    expected[ytid] = labels
    sf.write(audio_dir / f"Y{ytid}.wav", 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * t), 16000)
    rows.append(f'{ytid}, 0.000, 0.500, "{",".join(f"/m/{c}" for c in labels)}"')
  (tmp_path / "train_segments.csv").write_text("\n".join(["# YTID, start, end, labels"] + rows))
  (tmp_path / "classes.csv").write_text(
      "index,mid,display_name\n" + "".join(f"{c},/m/{c},class {c}\n" for c in range(4)))
  out = tmp_path / "out"
  _run(f"--audio_dir={audio_dir}", f"--output_dir={out}", "--num_workers=0",
       f"--segments_csv={tmp_path / 'train_segments.csv'}",
       f"--labels_csv={tmp_path / 'classes.csv'}")
  with np.load(out / "audio_logmel" / "1.1.0" / "labels-train.npz") as index:
    ids, offsets, classes = index["ids"], index["offsets"], index["classes"]
  assert sorted(i.decode() for i in ids) == sorted(expected)
  for row, ytid in enumerate(ids):
    assert classes[offsets[row]:offsets[row + 1]].tolist() == expected[ytid.decode()]
