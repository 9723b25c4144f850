"""The native model folder (config.json, model.safetensors, README.md): export of a model the
original cannot express (2-D rotary positions), its three readers, its model card, bad folders."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import soundfile as sf
from flax import traverse_util

from audiomaepp import audio
from audiomaepp import checkpointing
from audiomaepp import hear_api
from audiomaepp import models
from audiomaepp import native_io
from audiomaepp.errors import UserError
from audiomaepp.models import classifier as classifier_lib
from audiomaepp.train import finetune
import faults
import finetune_tasks
from conftest import experiment_config

# Train losses of the run: one after the exported step, which the card must not report.
LOSSES = {2: 0.93, 6: 0.61, 7: 0.4512, 9: 0.3}


def _params(model_config, seed):
  module = models.build_model(model_config)
  return models.unbox(module.init({"params": jax.random.PRNGKey(seed),
                                   "masking": jax.random.PRNGKey(0)},
                                  jnp.zeros((1, *module.config.input_shape))))["params"]


@pytest.fixture(scope="module")
def params():
  """Parameters of steps 3 and 7 of the run: the demo model shrunk to width 32 (patch_2d RoPE in
  encoder and decoder)."""
  step7 = _params(finetune_tasks.tiny_finetune_config("unused").model, 2)
  return {3: jax.tree.map(lambda x: x - 1, step7), 7: step7}


@pytest.fixture(scope="module")
def run(tmp_path_factory, params):
  """A pretraining workdir of the demo config with the model of `params`: steps 3 and 7, and a
  metrics.jsonl."""
  workdir = tmp_path_factory.mktemp("native") / "demo"
  config = experiment_config("demo")
  config.model = finetune_tasks.tiny_finetune_config("unused").model
  assert config.model.encoder_rope == config.model.decoder_rope == "patch_2d"
  for step, step_params in params.items():
    checkpointing.save_params(workdir, step_params, step=step)
  checkpointing.save_config(workdir, config)
  (workdir / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "split": "train", "loss": loss}) + "\n"
      for s, loss in LOSSES.items()) + json.dumps({"step": 7, "split": "eval", "loss": 0.2}) + "\n")
  return workdir


@pytest.fixture(scope="module")
def exported(run):
  """The folder of the newest step."""
  output = run.parent / "exported"
  native_io.export(str(run), str(output))
  return output


def _copy(folder, target):
  """A copy of the model folder `folder` at `target`."""
  target.mkdir()
  for name in (native_io.CONFIG_FILE, native_io.MODEL_FILE, native_io.CARD_FILE):
    (target / name).write_bytes((folder / name).read_bytes())
  return target


def test_folder_holds_the_resolved_config_and_the_parameters_by_their_names(run, params,
                                                                            exported):
  assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json",
                                                        "model.safetensors"]
  umask = os.umask(0)
  os.umask(umask)
  for path in exported.iterdir():  # files anyone may read where the umask lets them
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
  recorded = checkpointing.load_config(str(run)).model
  config = json.loads((exported / "config.json").read_text())
  assert config == json.loads(json.dumps(models.resolve_model_config(recorded).to_dict()))
  assert config["encoder_rope"] == "patch_2d" and config["width"] == 32
  tensors = safetensors.numpy.load_file(exported / "model.safetensors")
  expected = traverse_util.flatten_dict(params[7], sep="/")
  assert set(tensors) == set(expected)
  assert "encoder/blocks/attn/rope_freqs" in tensors and "cls_token" in tensors
  for name, value in expected.items():
    assert tensors[name].dtype == np.float32
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_load_model_gives_the_workdirs_embeddings_bit_for_bit(run, exported):
  clips = 0.1 * np.random.default_rng(0).standard_normal((2, 40000)).astype(np.float32)
  from_folder = hear_api.get_scene_embeddings(clips, hear_api.load_model(str(exported)))
  from_workdir = hear_api.get_scene_embeddings(clips, hear_api.load_model(str(run)))
  assert from_folder.shape == (2, 5 * 32)
  np.testing.assert_array_equal(np.asarray(from_folder), np.asarray(from_workdir))
  with pytest.raises(UserError, match=r"is an exported model folder, which holds one step; "
                                      r"drop step=3$"):
    hear_api.load_model(str(exported), step=3)


def test_init_from_the_folder_gives_the_workdirs_encoder(tmp_path, run, exported):
  model_config = finetune_tasks.tiny_finetune_config("unused").model
  classifier = classifier_lib.build_classifier(models.resolve_model_config(model_config), 3)
  target = jax.eval_shape(lambda: models.unbox(classifier.init(
      {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 200, 80))))["params"])
  encoders = [finetune.pretrained_encoder(
      finetune_tasks.tiny_finetune_config("unused", init_from=str(source)), target)
      for source in (run, exported)]
  leaves = [dict(traverse_util.flatten_dict(e, sep="/")) for e in encoders]
  assert set(leaves[0]) == set(leaves[1]) and "decoder" not in encoders[1]
  for name, value in leaves[0].items():
    np.testing.assert_array_equal(np.asarray(leaves[1][name]), np.asarray(value), err_msg=name)

  config = finetune_tasks.tiny_finetune_config("unused", init_from=str(exported))
  config.init_step = 3
  with pytest.raises(finetune.ConfigError, match="drop config.init_step=3$"):
    finetune.pretrained_encoder(config, target)
  bad = _copy(exported, tmp_path / "bad")
  (bad / "config.json").unlink()
  with pytest.raises(finetune.ConfigError, match=f"^config.init_from={bad}: {bad}: no config.json"):
    finetune.pretrained_encoder(
        finetune_tasks.tiny_finetune_config("unused", init_from=str(bad)), target)


def test_model_card_says_what_the_run_recorded(run, exported):
  card = (exported / "README.md").read_text()
  counts = models.parameter_counts(checkpointing.load_config(str(run)).model)
  for line in (
      f"Exported from `{run}` at step 7 ",
      "| size | custom |",
      "| encoder | transformer++ (SwiGLU): width 32, depth 1, 2 heads, MLP ratio 4 |",
      "| decoder | transformer++ (SwiGLU): width 32, depth 1, 2 heads |",
      "| patch size | 4 frames x 16 mel bins: a 50 x 5 grid |",
      "| encoder positions | fixed 2-D sin-cos table + RoPE over the (time, frequency) patch "
      "position (patch_2d) |",
      f"| parameters | {counts['trainable']:,} trainable: encoder {counts['encoder']:,}, "
      f"decoder {counts['decoder']:,} |",
      "| data | source `synthetic`, name `audio_logmel`, data_dir not set |",
      "| steps | 7 |",
      "| final loss | 0.4512 (train) |",
      f'model = hear_api.load_model("{exported}")',
      f"python -m audiomaepp.tools.embed --checkpoint={exported} ",
      f"--config.init_from={exported} "):
    assert line in card, line
  assert "probe" not in card.lower()  # nothing in a pretraining workdir records probe scores


def test_an_older_step_and_a_run_without_metrics(run, params, tmp_path):
  native_io.export(str(run), str(tmp_path / "step3"), step=3)
  card = (tmp_path / "step3" / "README.md").read_text()
  assert "| steps | 3 |" in card and "| final loss | 0.93 (train) |" in card
  model_config = checkpointing.load_config(str(run)).model
  np.testing.assert_array_equal(
      safetensors.numpy.load_file(tmp_path / "step3" / "model.safetensors")["cls_token"],
      params[3]["cls_token"])
  bare = tmp_path / "bare"
  config = experiment_config("demo")
  config.model = model_config
  config.model.encoder_rope = config.model.decoder_rope = "none"
  checkpointing.save_params(bare, _params(config.model, 0), step=0)
  checkpointing.save_config(bare, config)
  native_io.export(str(bare), str(tmp_path / "bare_out"))
  card = (tmp_path / "bare_out" / "README.md").read_text()
  assert "| final loss | not recorded |" in card and "| steps | 0 |" in card
  assert "| encoder positions | fixed 2-D sin-cos table |" in card


def _damage(folder, change):
  """Applies `change` to the copy of a model folder."""
  config = json.loads((folder / "config.json").read_text())
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  if change.startswith("no "):
    (folder / change[3:]).unlink()
  elif change == "depth 2":
    config["depth"] = 2  # the scanned blocks' leading axis
  elif change == "width 33":
    config["width"] = 33
  elif change == "missing tensor":
    del tensors["encoder/norm/scale"]
  else:
    tensors["aaa"] = np.zeros(1, np.float32)
  if change.startswith(("depth", "width")):
    (folder / "config.json").write_text(json.dumps(config))
  if change.endswith("tensor"):
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("change,message", [
    ("no config.json", "{folder}: no config.json; expected a model folder written by "
     "audiomaepp.tools.export --format=native (config.json, model.safetensors) or a workdir "
     "with checkpoints/"),
    ("no model.safetensors", "{folder}: no model.safetensors; expected a model folder written by "
     "audiomaepp.tools.export --format=native (config.json, model.safetensors) or a workdir "
     "with checkpoints/"),
    ("missing tensor", "{folder}/model.safetensors does not match the model of "
     "{folder}/config.json: it has no tensor encoder/norm/scale"),
    ("extra tensor", "{folder}/model.safetensors does not match the model of "
     "{folder}/config.json: it has tensor aaa, which is no parameter of that model"),
    ("depth 2", "{folder}/model.safetensors does not match the model of {folder}/config.json: "
     "it has encoder/blocks/attn/out/bias of shape (1, 32), the model's is (2, 32)"),
    ("width 33", "{folder}/config.json: config.model.num_heads=2 must be positive and divide "
     "config.model.width=33"),
])
def test_a_damaged_folder_names_its_first_problem(exported, tmp_path, change, message):
  folder = _copy(exported, tmp_path / "copy")
  _damage(folder, change)
  with pytest.raises(UserError) as error:
    hear_api.load_model(str(folder))
  assert str(error.value) == message.format(folder=folder)


def test_existing_output_and_non_finite_weights_are_refused_and_write_nothing(run, params,
                                                                             exported, tmp_path):
  with pytest.raises(UserError, match=f"^{exported} already exists; choose another folder"):
    native_io.export(str(run), str(exported))
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="already exists"):
    native_io.export(str(run), str(tmp_path / "file"))
  bad = {**params[7], "cls_token": np.full(params[7]["cls_token"].shape, np.nan, np.float32)}
  with pytest.raises(UserError, match=r"^non-finite weights \(NaN or inf\) in \['cls_token'\]; "
                                      "refusing to export them$"):
    native_io.write(str(tmp_path / "nan"), checkpointing.load_config(str(run)).model, bad, "card")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_folders_and_fine_tuning_workdirs_are_not_sources(exported, tmp_path):
  with pytest.raises(UserError, match="is an exported model folder already; copy it$"):
    native_io.export(str(exported), str(tmp_path / "again"))
  config = finetune_tasks.tiny_finetune_config("unused")
  checkpointing.save_config(tmp_path / "ft", config)
  with pytest.raises(UserError, match="is a fine-tuning workdir"):
    native_io.export(str(tmp_path / "ft"), str(tmp_path / "out"))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


@pytest.mark.integration
def test_export_and_embed_command_lines(run, tmp_path):
  out = tmp_path / "model"
  done = _cli("audiomaepp.tools.export", f"--checkpoint={run}", "--format=native",
              f"--output={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == (f"wrote {out} (config.json, model.safetensors, README.md); read "
                                 "it with audiomaepp.hear_api.load_model")
  for flags, message in (
      (["--format=native", f"--output={out}"], f"error: --output={out} already exists; choose "
                                                "another folder or remove it"),
      ([f"--output={tmp_path / 'model.safetensors'}"],
       "error: config.model.encoder_rope='patch_2d' has no equivalent in the original (only "
       "['none', 'sequence']); --format=native exports any model")):
    done = _cli("audiomaepp.tools.export", f"--checkpoint={run}", *flags)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == message, done.stderr

  clip = tmp_path / "clip.wav"
  sf.write(clip, 0.1 * np.random.default_rng(1).standard_normal(24000), 16000)
  done = _cli("audiomaepp.tools.embed", f"--checkpoint={out}", f"--audio={clip}",
              f"--output_dir={tmp_path / 'emb'}")
  assert done.returncode == 0, done.stderr[-2000:]
  expected = hear_api.get_scene_embeddings(audio.load_audio(clip)[None],
                                           hear_api.load_model(str(run)))[0]
  np.testing.assert_allclose(np.load(tmp_path / "emb" / "clip.npy"), expected, atol=1e-6)


def test_a_damaged_newest_step_is_refused_not_replaced(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  assert faults.truncate_checkpoint_arrays(workdir / "checkpoints" / "7")
  with pytest.raises(UserError, match=f"^no checkpoint of {workdir} can be restored \\(step 7: "):
    native_io.export(str(workdir), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  native_io.export(str(workdir), str(tmp_path / "out"), step=3)
  assert "| steps | 3 |" in (tmp_path / "out" / "README.md").read_text()
