"""Fine-tuning: metrics against scikit-learn, the classifier against the pretrained encoder, the
optimiser's layer decay, augmentation and one-line errors (batches: test_labelled.py)."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as sk_metrics

from audiomaepp import checkpointing
from audiomaepp import experiment
from audiomaepp import models
from audiomaepp.data import labelled
from audiomaepp.errors import UserError
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.models import classifier as classifier_lib
from audiomaepp.train import finetune
from audiomaepp.train import finetune_step
from audiomaepp.train import state as state_lib

import finetune_tasks


def _model_config(scan_layers=True, width=32, depth=2):
  config = finetune_tasks.tiny_finetune_config("unused")
  config.model.depth = depth
  config.model.width = width
  config.model.scan_layers = scan_layers
  return config, models.resolve_model_config(config.model)


def test_map_and_per_class_ap_equal_scikit_learn():
  rng = np.random.default_rng(0)
  targets = (rng.random((60, 7)) < 0.3).astype(np.float32)
  targets[0] = 1.0  # every class has a positive
  logits = rng.standard_normal((60, 7)).astype(np.float32)
  logits[:10, 2] = 0.5  # ties
  result = finetune.score_predictions(logits, targets, multilabel=True)
  expected = sk_metrics.average_precision_score(targets, logits, average="macro")
  np.testing.assert_allclose(result["mAP"], expected, rtol=1e-6)
  np.testing.assert_allclose(result["per_class_ap"],
                             sk_metrics.average_precision_score(targets, logits, average=None),
                             rtol=1e-6)
  assert result["score"] == result["mAP"]


def test_top1_for_single_label():
  targets = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
  logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 0, 1]]
  result = finetune.score_predictions(logits, targets, multilabel=False)
  assert result["top1_acc"] == pytest.approx(3 / 5)
  assert sk_metrics.accuracy_score(targets.argmax(1), logits.argmax(1)) == pytest.approx(3 / 5)


@pytest.mark.parametrize("pretrained_scanned,scanned", [(True, True), (True, False),
                                                        (False, True)])
@pytest.mark.integration
def test_classifier_from_pretrained_reads_the_encoders_mean_token(pretrained_scanned, scanned):
  """Logits = head(mean of MaskedAutoencoder.encode's tokens) with the pretrained weights, in
  either block layout; the decoder is dropped."""
  _, pre_config = _model_config(pretrained_scanned)
  _, config = _model_config(scanned)
  mae = models.build_model(pre_config)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *config.input_shape))
  pretrained = models.unbox(mae.init({"params": jax.random.PRNGKey(2),
                                      "masking": jax.random.PRNGKey(3)}, x))["params"]
  classifier = classifier_lib.build_classifier(config, 5, drop_path=0.1)
  params = models.unbox(classifier.init({"params": jax.random.PRNGKey(4)}, x))["params"]
  encoder = classifier_lib.encoder_from_pretrained(pretrained, params, "test")
  assert "decoder" not in encoder
  params = {**params, **encoder}
  logits = classifier.apply({"params": params}, x)
  tokens = mae.apply({"params": pretrained}, x, method=mae.encode)["tokens"]
  pooled = tokens.mean(axis=(1, 2))
  expected = pooled @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_encoder_that_does_not_fit_is_one_line():
  _, small = _model_config(width=32)
  _, wide = _model_config(width=64)
  x = jnp.zeros((1, *small.input_shape))
  pretrained = models.unbox(models.build_model(wide).init(
      {"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(0)}, x))["params"]
  target = models.unbox(classifier_lib.build_classifier(small, 3).init(
      {"params": jax.random.PRNGKey(0)}, x))["params"]
  with pytest.raises(ValueError) as error:
    classifier_lib.encoder_from_pretrained(pretrained, target, "config.init_from=runs/x")
  message = str(error.value)
  assert "\n" not in message and "config.init_from=runs/x" in message and "shape" in message


@pytest.mark.integration
def test_drop_path_only_in_training():
  _, config = _model_config()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, *config.input_shape))
  plain = classifier_lib.build_classifier(config, 3, drop_path=0.0)
  dropping = classifier_lib.build_classifier(config, 3, drop_path=0.9)
  params = plain.init({"params": jax.random.PRNGKey(0)}, x)
  eval_out = plain.apply(params, x)
  np.testing.assert_array_equal(dropping.apply(params, x), eval_out)
  np.testing.assert_array_equal(plain.apply(params, x, train=True), eval_out)
  trained = dropping.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
  assert not np.allclose(trained, eval_out)
  np.testing.assert_allclose(classifier_lib.drop_path_rates(0.1, 3), [0.0, 0.05, 0.1])


@pytest.mark.integration
def test_several_crops_of_a_clip_are_scored_by_the_mean_of_their_logits():
  config, model_config = _model_config()
  model = finetune_step.build_model(config, model_config, 3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, *model_config.input_shape))
  params = model.init({"params": jax.random.PRNGKey(0)}, x[:, 0])["params"]
  predict = functools.partial(finetune_step.predict_step, model=model)
  per_crop = np.stack([predict(params, {"spectrogram": x[:, k]}) for k in range(3)], axis=1)
  np.testing.assert_allclose(predict(params, {"spectrogram": x}), per_crop.mean(axis=1),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(per_crop[:, 0], per_crop[:, 1])  # the crops differ


def test_eval_crops_below_one_is_one_line():
  config, _ = _model_config()
  config.data.eval_crops = 0
  with pytest.raises(UserError, match=r"^config.data.eval_crops=0: expected 1 or more crops "
                     r"per clip$"):
    finetune.validate_config(config)


@pytest.mark.parametrize("scanned", [True, False])
def test_layer_scales_follow_beit(scanned):
  _, config = _model_config(scanned, depth=2)
  params = models.unbox(classifier_lib.build_classifier(config, 3).init(
      {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, *config.input_shape))))["params"]
  scales = finetune_step.layer_scales(params, depth=2, layer_decay=0.5)
  assert scales["head"]["kernel"] == 1.0
  assert scales["encoder"]["norm"]["scale"] == 1.0
  assert scales["patch_embed"]["kernel"] == 0.5 ** 3
  assert scales["cls_token"] == 0.5 ** 3
  if scanned:
    np.testing.assert_allclose(
        np.ravel(scales["encoder"]["blocks"]["attn"]["qkv"]["kernel"]), [0.25, 0.5])
  else:
    assert scales["encoder"]["block_0"]["attn"]["qkv"]["kernel"] == 0.25
    assert scales["encoder"]["block_1"]["attn"]["qkv"]["kernel"] == 0.5
  frozen = finetune_step.layer_scales(params, 2, 0.5, freeze_encoder=True)
  assert frozen["head"]["bias"] == 1.0 and frozen["encoder"]["norm"]["bias"] == 0.0


@pytest.mark.integration
def test_layer_decay_scales_each_parameters_update():
  """One AdamW step with layer decay moves each parameter by its scale x the undecayed step."""
  config, model_config = _model_config(depth=2)
  config.weight_decay = 0.0
  model = finetune_step.build_model(config, model_config, 3)
  params = models.unbox(model.init({"params": jax.random.PRNGKey(0)},
                                   jnp.zeros((1, *model_config.input_shape))))["params"]
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  deltas = {}
  for decay in (1.0, 0.5):
    config.finetune.layer_decay = decay
    tx = finetune_step.create_optimizer(config, optax.constant_schedule(0.1), params, 2)
    updates, _ = tx.update(grads, tx.init(params), params)
    deltas[decay] = updates
  ratio = jax.tree.map(lambda a, b: a / b, deltas[0.5], deltas[1.0])
  np.testing.assert_allclose(ratio["patch_embed"]["kernel"], 0.125, rtol=1e-6)
  np.testing.assert_allclose(ratio["head"]["kernel"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(ratio["encoder"]["blocks"]["attn"]["qkv"]["kernel"][1], 0.5,
                             rtol=1e-6)


def test_a_frozen_encoder_step_moves_only_the_head_as_the_full_step_does_at_a_third_less_cost():
  config, model_config = _model_config(depth=2)
  config.finetune.drop_path, config.finetune.mixup = 0.0, 0.0
  model = finetune_step.build_model(config, model_config, 3)
  params = models.unbox(model.init({"params": jax.random.PRNGKey(0)},
                                   jnp.zeros((1, *model_config.input_shape))))["params"]
  batch = {"spectrogram": jax.random.normal(jax.random.PRNGKey(1), (4, *model_config.input_shape)),
           "targets": jnp.eye(3)[jnp.asarray([0, 1, 2, 0])]}
  steps, flops = {}, {}
  for freeze in (False, True):
    config.finetune.freeze_encoder = freeze
    tx = finetune_step.create_optimizer(config, optax.constant_schedule(1e-2), params, 2)
    step = jax.jit(functools.partial(
        finetune_step.train_step, model=model, tx=tx, schedule=optax.constant_schedule(1e-2),
        finetune=config.finetune, multilabel=False, ema_decay=0.0))
    state = state_lib.new_state(params, tx)
    flops[freeze] = step.lower(state, batch, jax.random.PRNGKey(2)).compile().cost_analysis()[
        "flops"]
    steps[freeze] = step(state, batch, jax.random.PRNGKey(2))
  (full, full_metrics), (frozen, frozen_metrics) = steps[False], steps[True]
  np.testing.assert_allclose(frozen_metrics["loss"], full_metrics["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               frozen.params["head"], full.params["head"])
  jax.tree.map(np.testing.assert_array_equal,
               {k: v for k, v in frozen.params.items() if k != "head"},
               {k: v for k, v in params.items() if k != "head"})
  assert not np.allclose(full.params["patch_embed"]["kernel"], params["patch_embed"]["kernel"])
  assert flops[True] < 0.7 * flops[False]


def test_spec_augment_masks_one_band_of_each_axis():
  x = jnp.ones((16, 200, 80))
  out = np.asarray(finetune_step.spec_augment(jax.random.PRNGKey(0), x, 37, 30))
  for example in out:
    masked_time = np.flatnonzero((example == 0).all(axis=1))
    masked_freq = np.flatnonzero((example == 0).all(axis=0))
    for band, limit in ((masked_time, 37), (masked_freq, 30)):
      assert band.size < limit
      if band.size:
        assert np.all(np.diff(band) == 1)  # contiguous
    assert (example == 0).sum() == (masked_time.size * 80 + masked_freq.size * 200
                                    - masked_time.size * masked_freq.size)
  assert (out == 0).any()
  np.testing.assert_array_equal(finetune_step.spec_augment(jax.random.PRNGKey(0), x, 0, 0), x)


def test_mixup_mixes_inputs_and_targets_with_the_reversed_batch():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 16))
  y = jnp.eye(4)
  mixed_x, mixed_y = finetune_step.mixup(jax.random.PRNGKey(1), x, y, 0.5)
  lam = float(mixed_y[0, 0])
  np.testing.assert_allclose(mixed_y[0, 3], 1 - lam, rtol=1e-6)
  np.testing.assert_allclose(mixed_x, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)


def test_label_outside_the_vocabulary_is_one_line(tmp_path):
  task_dir = finetune_tasks.write_tone_task(tmp_path)
  mapping = json.loads((task_dir / "train.json").read_text())
  mapping["000.wav"] = ["violin"]
  (task_dir / "train.json").write_text(json.dumps(mapping))
  config = finetune_tasks.tiny_finetune_config(task_dir)
  with pytest.raises(UserError, match="not in the vocabulary") as error:
    finetune.run(config, str(tmp_path / "ft"))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "ft").exists()


def test_num_classes_that_differs_from_the_task_is_one_line(tmp_path):
  config = finetune_tasks.tiny_finetune_config(finetune_tasks.write_tone_task(tmp_path))
  config.num_classes = 527
  with pytest.raises(finetune.ConfigError, match=r"config.num_classes=527 differs from the 3 "):
    finetune.run(config, str(tmp_path / "ft"))


@pytest.mark.integration
def test_init_from_an_encoder_of_another_width_is_one_line_and_writes_nothing(tmp_path):
  pretrain = experiment.load_config(pathlib.Path(__file__).parents[1] / "configs" /
                                    "demo.py")
  pretrain.model.depth = 1  # width 128, the tiny fine-tuning config has width 32
  module = models.build_model(pretrain.model)
  params = models.unbox(module.init({"params": jax.random.PRNGKey(0),
                                     "masking": jax.random.PRNGKey(0)},
                                    jnp.zeros((1, 200, 80))))["params"]
  checkpointing.save_params(tmp_path / "pre", params)
  checkpointing.save_config(tmp_path / "pre", pretrain)
  config = finetune_tasks.tiny_finetune_config(finetune_tasks.write_tone_task(tmp_path),
                                               init_from=str(tmp_path / "pre"))
  with pytest.raises(finetune.ConfigError, match="does not fit config.model") as error:
    finetune.run(config, str(tmp_path / "ft"))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "ft" / checkpointing.CONFIG_FILE).exists()


def test_task_folder_decodes_to_standardised_log_mels(tmp_path):
  task = tasks_lib.read_hear_task(finetune_tasks.write_tone_task(tmp_path, multilabel=True))
  split = labelled.load_split(task, "valid")
  assert len(split) == 12 and split.targets.shape == (12, 3)
  assert split.spectrograms[0].shape == (101, 80)
  np.testing.assert_allclose(split.spectrograms[0].mean(), 0.0, atol=1e-5)
