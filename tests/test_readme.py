"""The README's feature-extraction snippet runs as written (on a small imported model)."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from audiomaepp import original
from conftest import experiment_config

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
  text = README.read_text().split(f"## {section}\n", 1)[1]
  return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.integration
def test_feature_extraction_snippet_prints_what_the_readme_says(fixtures_dir, tmp_path):
  workdir = tmp_path / "model"
  original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), str(workdir),
                             original_args=str(fixtures_dir / "maepp_micro_config.json"))
  width = int(np.load(fixtures_dir / "maepp_micro_weights.npz")["encoder.encoder_norm.weight"].size)
  snippet = _python_block("Feature extraction")
  assert '"workdirs/demo"' in snippet
  done = subprocess.run([sys.executable, "-c", snippet.replace('"workdirs/demo"', f'"{workdir}"')],
                        cwd=tmp_path, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  printed = done.stdout.strip().splitlines()[-1]
  assert printed == f"(1, {5 * width}) (1, 76, {5 * width}) [ 0.  39.5 78.9]"
  demo = 5 * experiment_config("demo").model.width
  assert (f"prints `(1, {demo}) (1, 76, {demo}) [ 0.  39.5 78.9]` for the demo model"
          in README.read_text())
