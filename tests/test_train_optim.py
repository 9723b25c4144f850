"""The learning-rate schedule, the weight-decay mask and the optimiser (docs/reference.md)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from audiomaepp import models
from audiomaepp.train import optim
from audiomaepp import experiment
from conftest import experiment_config


def _hand_lr(update, peak, warmup, total, min_lr):
  """The original's per-iteration rule (MAE `adjust_learning_rate`), written out by hand."""
  if update < warmup:
    return peak * update / warmup
  progress = (update - warmup) / (total - warmup)
  return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(**overrides):
  """(schedule, optimiser) of Tiny at batch 256 over 10 steps without warm-up (peak 1.5e-4)."""
  config = experiment.base_config("tiny")
  config.update(batch_size=256, warmup_epochs=0, num_train_steps=10, **overrides)
  schedule = optim.learning_rate_schedule(config, 2560, 10)
  return schedule, optim.create_optimizer(config, schedule)


def test_base_config_peak_learning_rate_is_spec():
  # docs/reference.md#optimisation: 1.5e-4 x 1024 / 256 = 6e-4, times the accumulation steps.
  config = experiment_config("base")
  assert optim.peak_learning_rate(config) == pytest.approx(6e-4)
  config.grad_accum_steps = 4
  assert optim.peak_learning_rate(config) == pytest.approx(2.4e-3)


@pytest.mark.parametrize("accum,min_lr", [(1, 0.0), (2, 1e-6)])
def test_schedule_matches_hand_formula(accum, min_lr):
  config = experiment.base_config("tiny")
  config.update(batch_size=64, num_epochs=10, warmup_epochs=2, grad_accum_steps=accum,
                min_lr=min_lr)
  num_examples = 64 * 25  # 25 steps per epoch
  total = optim.total_train_steps(config, num_examples)
  assert total == 250
  schedule = optim.learning_rate_schedule(config, num_examples, total)
  peak = 1.5e-4 * 64 * accum / 256
  updates, warmup = total // accum, 50 // accum
  for update in [0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, updates // 2, updates - 1,
                 updates]:
    assert float(schedule(update)) == pytest.approx(
        _hand_lr(update, peak, warmup, updates, min_lr), rel=1e-5, abs=1e-12), update


def test_num_train_steps_overrides_epochs():
  config = experiment.base_config("tiny")
  config.update(batch_size=32, num_epochs=100, num_train_steps=7)
  assert optim.total_train_steps(config, 10_000) == 7
  config.num_train_steps = -1
  assert optim.total_train_steps(config, 10_000) == 100 * (10_000 // 32)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_decay_mask_matches_original_rule_on_tiny_model(fixtures_dir, scan_layers):
  """Decayed / not-decayed parameter counts of our Tiny equal the original's param groups.

  The original (timm `param_groups_weight_decay`) skips weight decay for 1-D tensors and names
  ending in `.bias`; the fixed sin-cos tables are buffers, not parameters.
  """
  shapes = json.loads((fixtures_dir / "original_state_dict_shapes.json").read_text())
  original = shapes["maepp_tiny_200_16x4"]
  trainable = {k: v for k, v in original.items() if not k.endswith("pos_embed")}
  decayed_ref = sum(np.prod(v) for k, v in trainable.items()
                    if len(v) >= 2 and not k.endswith(".bias"))
  plain_ref = sum(np.prod(v) for k, v in trainable.items()
                  if len(v) < 2 or k.endswith(".bias"))

  model_config = experiment.model_config("tiny")
  model_config.scan_layers = scan_layers
  params = models.param_shapes(model_config)
  mask = traverse_util.flatten_dict(optim.decay_mask(params))
  flat = traverse_util.flatten_dict(params)
  decayed = sum(np.prod(flat[k].shape) for k, m in mask.items() if m)
  plain = sum(np.prod(flat[k].shape) for k, m in mask.items() if not m)
  assert (decayed, plain) == (decayed_ref, plain_ref)
  assert mask[("cls_token",)] and mask[("decoder", "mask_token")]
  assert mask[("patch_embed", "kernel")] and not mask[("patch_embed", "bias")]


def test_adamw_decays_only_masked_leaves():
  """With zero gradients AdamW's update is -lr * wd * param on decayed leaves and 0 elsewhere."""
  _, tx = _optimizer(weight_decay=0.05)
  params = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
            "norm": {"scale": jnp.full((4,), 2.0)}, "cls_token": jnp.full((1, 1, 4), 2.0)}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  lr = 1.5e-4  # peak at update 0 of a schedule without warm-up
  np.testing.assert_allclose(updates["dense"]["kernel"], -lr * 0.05 * 2.0, rtol=1e-5)
  np.testing.assert_allclose(updates["cls_token"], -lr * 0.05 * 2.0, rtol=1e-5)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def test_gradient_accumulation_applies_the_mean():
  """MultiSteps: no update on the first micro-step, then Adam on the mean of the two gradients."""
  schedule, tx = _optimizer(weight_decay=0.0, grad_accum_steps=2)
  params = {"w": jnp.zeros((2, 2))}
  state = tx.init(params)
  g1, g2 = jnp.array([[1.0, -2.0], [3.0, 0.5]]), jnp.array([[3.0, 2.0], [-1.0, 0.5]])
  first, state = tx.update({"w": g1}, state, params)
  np.testing.assert_array_equal(first["w"], 0.0)
  second, _ = tx.update({"w": g2}, state, params)
  reference = optax.adam(float(schedule(0)), b1=0.9, b2=0.95)
  expected, _ = reference.update({"w": (g1 + g2) / 2}, reference.init(params), params)
  np.testing.assert_allclose(second["w"], expected["w"], rtol=1e-6)


def test_gradient_clipping_by_global_norm():
  """With clipping, Adam sees g * min(1, c / |g|) (computed here by hand) at every step."""
  schedule, tx = _optimizer(weight_decay=0.0, grad_clip_norm=1.0)
  reference = optax.adam(schedule, b1=0.9, b2=0.95)
  params = {"w": jnp.zeros((3,))}
  state, ref_state = tx.init(params), reference.init(params)
  for g in (np.array([6.0, 8.0, 0.0]), np.array([0.03, -0.04, 0.0])):
    clipped = g * min(1.0, 1.0 / np.linalg.norm(g))
    update, state = tx.update({"w": jnp.asarray(g)}, state, params)
    expected, ref_state = reference.update({"w": jnp.asarray(clipped)}, ref_state, params)
    np.testing.assert_allclose(update["w"], expected["w"], rtol=1e-5)
