"""Training parity with the original trainer (benchmarks/train_parity.py).

Torch-free: the masking seam of `train_step` and the written-out original schedule. With torch
and the original code (skipped without them): the original's parameter groups against our decay
mask, and (slow) a lockstep run of both trainers on a micro model.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiomaepp import models
from audiomaepp import original
from audiomaepp.train import optim
from audiomaepp.train import step as step_lib
import original_code
import conftest
from conftest import CONFIGS


@pytest.fixture(scope="module")
def parity():
  with conftest.benchmark_module("train_parity") as module:
    yield module


def test_original_fixture_noise_gives_the_original_masks(fixtures_dir):
  io = dict(np.load(fixtures_dir / "maepp_micro_io.npz"))
  ids_keep, ids_restore, mask = models.masking_ids_from_noise(io["noise"], io["ids_keep"].shape[1])
  np.testing.assert_array_equal(ids_keep, io["ids_keep"])
  np.testing.assert_array_equal(ids_restore, io["ids_restore"])
  np.testing.assert_array_equal(mask, io["mask"])


@pytest.mark.integration
def test_train_step_with_noise_equals_the_drawn_masks(parity):
  """Noise that sorts into the masks the step draws itself gives the same step, bit for bit;
  other noise gives another loss."""
  recipe = parity.Recipe(batch_size=2, steps=10)
  config = parity.project_config(recipe, original.model_config_from_args(parity.MODEL_ARGS))
  config.model.depth, config.model.decoder_depth = 1, 1
  trainer = parity.ProjectTrainer(config, recipe.num_train, seed=3)
  c = trainer.model.config
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, *c.input_shape)))
  drawn = trainer.model.apply({"params": trainer.state.params}, x,
                              rngs={"masking": jax.random.fold_in(trainer.rng, 0)})
  noise = (np.asarray(drawn["ids_restore"]) + 0.5) / c.num_patches  # ranks -> U(0, 1) values
  step = jax.jit(functools.partial(step_lib.train_step, model=trainer.model, tx=trainer.tx,
                                   schedule=trainer.schedule))
  batch = {"spectrogram": x}
  state, metrics = step(trainer.state, batch, trainer.rng)
  state_fed, metrics_fed = step(trainer.state, batch, trainer.rng, noise=noise)
  assert float(metrics["loss"]) == float(metrics_fed["loss"]) == float(drawn["loss"])
  jax.tree.map(np.testing.assert_array_equal, state.params, state_fed.params)
  _, other = step(trainer.state, batch, trainer.rng, noise=1 - noise)
  assert float(other["loss"]) != float(metrics["loss"])


@pytest.mark.parametrize("steps", [50, 300])
def test_original_schedule_equals_ours(parity, steps):
  recipe = parity.Recipe(batch_size=8, steps=steps, min_lr=1e-5)
  config = parity.project_config(recipe, original.model_config_from_args(parity.MODEL_ARGS))
  schedule = optim.learning_rate_schedule(config, recipe.num_train, steps)
  ours = np.asarray([schedule(s) for s in range(steps)])
  theirs = np.asarray([parity.original_learning_rate(s, recipe) for s in range(steps)])
  assert theirs[0] == 0 and theirs.max() == pytest.approx(recipe.peak_lr)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)


def test_original_param_groups_equal_our_decay_mask(parity):
  original_code.original_models()  # skips without torch and the original's dependencies
  package = parity.original_package(str(original_code.ORIGINAL_CODE))
  model = parity.original_model(package, seed=0)
  groups = parity.original_param_groups(model, 0.05)
  decayed = {id(p) for p in groups[1]["params"]}
  theirs = {name: id(p) in decayed for name, p in model.named_parameters() if p.requires_grad}
  model_config = original.model_config_from_args(parity.MODEL_ARGS)
  params = models.unbox(models.build_model(model_config).init(
      {"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(1)},
      jnp.zeros((1, 200, 80)))["params"])
  mask = jax.tree.map(lambda m, p: np.full(p.shape, m, np.float32), optim.decay_mask(params),
                      params)
  ours = original.to_state_dict(mask, model_config)
  assert sum(theirs.values()) and not all(theirs.values())
  assert {k: bool(ours[k].all()) for k in theirs} == theirs
  assert all(ours[k].all() == ours[k].any() for k in theirs)  # one decision per tensor


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"grad_clip_norm": 0.05, "norm_pix_loss": True}],
                         ids=["official", "clipped_norm_pix"])
def test_lockstep_with_the_original_trainer(parity, options):
  """Same init, batches and masks: per-step losses within the benchmark's bounds, parameters
  within 1e-4 (the key bias, which follows rounding noise, aside)."""
  original_code.original_models()
  recipe = parity.Recipe(batch_size=4, steps=20, **options)
  result = parity.lockstep(recipe, str(original_code.ORIGINAL_CODE))
  rows = parity.lockstep_rows(result)
  assert all(result["masks_equal"])
  assert len(set(result["original"])) > 1  # it trains
  if recipe.grad_clip_norm:
    assert max(result["grad_norm"]) > 2 * recipe.grad_clip_norm  # the clipping acts
  for steps, worst, bound, met in parity.lockstep_verdicts(rows):
    assert met, f"steps {steps}: max |dloss| / loss {worst:.2e} > {bound:g}"
  groups = {g: d["rel"] for g, d in result["param_diff"].items() if not g.endswith("key bias")}
  assert max(groups.values()) <= 1e-4, groups


def test_torch_requirements_equal_the_setup_extra():
  """`make test-slow` installs requirements-torch.txt; `pip install .[torch]` the same pins."""
  root = CONFIGS.parent
  lines = (root / "requirements-torch.txt").read_text().splitlines()
  pinned = sorted(line for line in lines if line and not line.startswith("#"))
  extra = re.search(r'"torch": \[([^\]]*)\]', (root / "setup.py").read_text()).group(1)
  assert sorted(re.findall(r'"([^"]+)"', extra)) == pinned
  assert all(re.fullmatch(r"[\w-]+==[\d.]+", pin) for pin in pinned)
