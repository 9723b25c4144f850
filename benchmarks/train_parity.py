r"""Training with this project vs training with the original PyTorch trainer, on CPU in float32.

    python benchmarks/train_parity.py [--steps=50] [--seed_steps=300] [--seeds=3] \
        [--batch_size=8] [--grad_clip_norm=0] [--norm_pix_loss] [--original=../shared/original] \
        [--output=FILE]

Two comparisons on a micro AudioMAE++ (width 64, depth 2, 4 heads; decoder width 64, depth 1,
4 heads; transformer++ blocks with SwiGLU, no RoPE; input 200 x 80, mask ratio 0.8):

1. Lockstep, `--steps` steps. The original model is built and initialised by its own code; its
   weights are imported with `original.load` (what `tools.import_original` does). Both sides then
   see the same batches and the same masking noise (drawn once per step as the original's
   `random_masking` draws it, `torch.rand(N, L)`, and handed to `train.step.train_step` as its
   `noise`), and each runs its own optimiser step. Printed: both losses per step, their absolute
   and relative differences, whether the masks agreed, and after the last step the largest
   relative difference of the parameters (max |ours - original| / max |original| per tensor)
   in each group of tensors.
2. Seeds, `--seed_steps` steps, `--seeds` seeds per side: each side initialises its own model and
   draws its own masks from its own seeded RNG (torch's global generator; the trainer's
   `PRNGKey(seed)` split into init and train keys), on the same batches. Printed: mean +- sd over
   seeds of the loss averaged over the 10 steps up to step 100, 200, ..., and whether the two
   means lie within twice the pooled seed-to-seed sd.

The original trainer's set-up, from the official repository (`train_mae_spec.py`,
`src/mae_engine.py`, `src/misc.py`, `src/lr_sched.py`), is written out below (`OriginalTrainer`,
`original_param_groups`, `original_learning_rate`):
- AdamW with betas (0.9, 0.95), eps 1e-8 and two parameter groups: no weight decay for tensors of
  at most one dimension and for names ending in `.bias`, `weight_decay` (0.05) for the rest
  (timm's `param_groups_weight_decay`; frozen tensors such as the sin-cos tables are left out);
- the learning rate set before every step from the fractional epoch `step / steps_per_epoch`:
  linear warm-up from 0 over `warmup_epochs`, then a half cosine to `min_lr` at `num_epochs`;
  peak = learning_rate x batch_size / 256 (one process, no accumulation);
- the loss `mae_loss` (per-patch MSE over removed patches), backward, then
  `clip_grad_norm_(parameters, clip_grad_value)` only when the config sets `clip_grad_value`
  (the official configs do not: `--grad_clip_norm=0`), `optimizer.step()`, `zero_grad()`.
  The official step goes through a `torch.amp.GradScaler`; in float32 it multiplies the loss by
  a power of two and divides the gradients by it again (exact in binary floating point) and
  would skip a step with non-finite gradients, so it is left out here.
The recipe scales the official one (100 epochs, 10 of warm-up) down: an "epoch" is
`steps / 10` steps, warm-up 1 epoch, and `learning_rate` is chosen for a peak of 1e-3
(`--batch_size=8`: 3.2e-2), as a model this small needs to move within a few hundred steps.

Batches: clips of the built-in synthetic corpus (`data.synthetic.make_clip`), log-mel, each
clip standardised, 200-frame crops at offsets drawn per step (NumPy, seeded by the step).
Needs PyTorch, einops and rotary-embedding-torch and the original's code (`../shared/original`,
MIT licence, not part of the project); without them it prints why and exits 0.
"""
import contextlib
import dataclasses
import functools
import importlib.util
import io
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Optional
from unittest import mock

from absl import app
from absl import flags
import jax
import numpy as np

import common
from audiomaepp import experiment
from audiomaepp import models
from audiomaepp import original
from audiomaepp.audio import features
from audiomaepp.data import pipeline
from audiomaepp.data import synthetic
from audiomaepp.train import optim
from audiomaepp.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEPS = flags.DEFINE_integer("steps", 50, "Lockstep steps (same weights, batches and masks).")
_SEED_STEPS = flags.DEFINE_integer("seed_steps", 300, "Steps of each own-RNG run (0: none).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Own-RNG runs per side.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size of every step.")
_PEAK_LR = flags.DEFINE_float("peak_lr", 1e-3, "Peak learning rate (learning_rate x batch / 256).")
_GRAD_CLIP = flags.DEFINE_float("grad_clip_norm", 0.0, "Global-norm clipping (0: none, as the "
                                "official configs).")
_NORM_PIX = flags.DEFINE_bool("norm_pix_loss", False, "Per-patch normalised targets.")
_ORIGINAL = flags.DEFINE_string("original", os.path.join(REPO, "..", "shared", "original"),
                                "Directory holding the original's package audiomaepp_original.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")

# The original constructor's arguments of the micro model (`MAE_PlusPlus`).
MODEL_ARGS = dict(
    img_size=(200, 80), patch_size=(4, 16), in_chans=1, embed_dim=64, depth=2, num_heads=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4, mask_ratio=0.8,
    use_cls_token=True, encoder_plusplus_block=True, decoder_plusplus_block=True,
    encoder_use_swiglu_final_ffn=True, decoder_use_swiglu_final_ffn=True,
    encoder_use_rope=False, decoder_use_rope=False)
POOL_CLIPS = 64  # synthetic clips the batches are cropped from
WINDOW = 10  # own-RNG runs: steps averaged at each reported step
KEY_BIAS_NOTE = ("'key bias': the part of the qkv bias that shifts the keys; its gradient is zero "
                 "in exact arithmetic (softmax ignores a shift shared by all keys), so both sides "
                 "follow their own rounding noise there (AdamW normalises it to steps ~ lr).")
LOCKSTEP_BOUNDS = ((10, 1e-4), (None, 1e-3))  # (up to step, max |dloss| / loss); None: the rest


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The optimisation of one comparison, in the official config's terms."""
  batch_size: int
  steps: int
  peak_lr: float = 1e-3
  epochs: int = 10  # the official 100 epochs, 10 of warm-up, scaled to `steps`
  warmup_epochs: int = 1
  min_lr: float = 0.0
  weight_decay: float = 0.05
  betas: tuple[float, float] = (0.9, 0.95)
  grad_clip_norm: float = 0.0  # 0: no clipping (the official `clip_grad_value` is None)
  norm_pix_loss: bool = False

  @property
  def steps_per_epoch(self) -> int:
    if self.steps % self.epochs:
      raise ValueError(f"steps {self.steps}: expected a multiple of {self.epochs}")
    return self.steps // self.epochs

  @property
  def num_train(self) -> int:
    """Examples per epoch."""
    return self.steps_per_epoch * self.batch_size

  @property
  def learning_rate(self) -> float:
    """The official config's `opt.learning_rate` (peak = learning_rate x batch_size / 256)."""
    return self.peak_lr * 256 / self.batch_size


def missing_requirement(original_dir: str) -> str:
  """Why the comparison cannot run here ('' when it can)."""
  if not os.path.isdir(os.path.join(original_dir, "audiomaepp_original")):
    return f"the original's code is not at {original_dir} (--original=DIR)"
  for module in ("torch", "einops", "rotary_embedding_torch"):
    if importlib.util.find_spec(module) is None:
      return (f"{module} is not installed (pip install torch einops rotary-embedding-torch, "
              "or .venv/bin/pip install -e '.[torch]')")
  return ""


def original_package(original_dir: str):
  """The original's `audiomaepp_original` package (models, loss)."""
  path = os.path.abspath(original_dir)
  if path not in sys.path:
    sys.path.insert(0, path)
  import audiomaepp_original.loss  # pylint: disable=g-import-not-at-top
  import audiomaepp_original.models  # pylint: disable=g-import-not-at-top
  return audiomaepp_original


def original_model(package, seed: int, norm_pix_loss: bool = False):
  """The micro model as the original builds and initialises it under `torch.manual_seed(seed)`."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice about its patch layout
    model = package.models.MAE_PlusPlus(**MODEL_ARGS)
  model.norm_pix_loss = norm_pix_loss
  return model


# --- The original trainer's optimisation (official repository), written out for torch. --------

def original_param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
  """The official parameter groups: trainable tensors of at most one dimension and biases get no
  weight decay, the others `weight_decay`."""
  decay, no_decay = [], []
  for name, parameter in model.named_parameters():
    if not parameter.requires_grad:
      continue
    if parameter.ndim <= 1 or name.endswith(".bias"):
      no_decay.append(parameter)
    else:
      decay.append(parameter)
  return [{"params": no_decay, "weight_decay": 0.0},
          {"params": decay, "weight_decay": weight_decay}]


def original_learning_rate(step: int, recipe: Recipe) -> float:
  """The official per-step learning rate: linear warm-up in fractional epochs, then half cosine."""
  epoch = step / recipe.steps_per_epoch
  if epoch < recipe.warmup_epochs:
    return recipe.peak_lr * epoch / recipe.warmup_epochs
  progress = (epoch - recipe.warmup_epochs) / (recipe.epochs - recipe.warmup_epochs)
  return recipe.min_lr + (recipe.peak_lr - recipe.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def fixed_masking_noise(noise):
  """Within the block, the original's `torch.rand(N, L)` in `random_masking` returns `noise`."""
  import torch  # pylint: disable=g-import-not-at-top

  def rand(*size, **kwargs):
    del kwargs  # device: CPU
    size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
    if size != tuple(noise.shape):
      raise AssertionError(f"torch.rand{size}: the fixed noise is {tuple(noise.shape)}")
    return noise.clone()

  with mock.patch.object(torch, "rand", rand):
    yield


class OriginalTrainer:
  """The official training step (`mae_engine.train_mae`, one process, no accumulation)."""

  def __init__(self, package, model, recipe: Recipe):
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self._loss = functools.partial(package.loss.mae_loss, norm_pix_loss=recipe.norm_pix_loss)
    self.model = model.train()
    self.recipe = recipe
    self.optimizer = torch.optim.AdamW(original_param_groups(model, recipe.weight_decay),
                                       lr=recipe.peak_lr, betas=recipe.betas)

  def step(self, step: int, spectrogram: np.ndarray,
           noise: Optional[Any] = None) -> tuple[float, np.ndarray]:
    """One step on `spectrogram` (batch, time, mel); masks from `noise` (a torch (batch, L)
    tensor) or, when None, from torch's global RNG. Returns (loss, mask (batch, L))."""
    lr = original_learning_rate(step, self.recipe)
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    x = self._torch.from_numpy(spectrogram)[:, None]
    with fixed_masking_noise(noise) if noise is not None else contextlib.nullcontext():
      pred, target, mask = self.model(x)
    loss = self._loss(pred, target, mask)
    loss.backward()
    if self.recipe.grad_clip_norm > 0:
      self._torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip_norm)
    self.optimizer.step()
    self.optimizer.zero_grad()
    return loss.item(), mask.detach().numpy()

  def state_dict(self) -> dict[str, np.ndarray]:
    """The trainable tensors by original key name."""
    return {name: p.detach().numpy().copy() for name, p in self.model.named_parameters()
            if p.requires_grad}


# --- This project's side. ----------------------------------------------------------------------

def project_config(recipe: Recipe, model_config) -> Any:
  """A trainer config (`experiment.base_config`) with `recipe`'s optimisation and `model_config`."""
  config = experiment.base_config(size=None)
  config.model = model_config
  config.model.dtype = "float32"
  config.model.norm_pix_loss = recipe.norm_pix_loss
  config.batch_size = recipe.batch_size
  config.num_epochs = recipe.epochs
  config.num_train_steps = -1
  config.base_lr = recipe.learning_rate
  config.warmup_epochs = recipe.warmup_epochs
  config.min_lr = recipe.min_lr
  config.b1, config.b2 = recipe.betas
  config.weight_decay = recipe.weight_decay
  config.grad_clip_norm = recipe.grad_clip_norm
  return config


class ProjectTrainer:
  """`train.step.train_step` jitted, with the optimiser and schedule the trainer builds."""

  def __init__(self, config, num_train: int, params: Optional[Any] = None, seed: int = 0):
    """`num_train` examples per epoch; starts from `params` (None: the trainer's own init from
    `PRNGKey(seed)`)."""
    total = optim.total_train_steps(config, num_train)
    self.schedule = optim.learning_rate_schedule(config, num_train, total)
    self.tx = optim.create_optimizer(config, self.schedule)
    self.model = models.build_model(config.model)
    init_rng, self.rng = jax.random.split(jax.random.PRNGKey(seed))
    if params is None:
      self.state = step_lib.create_train_state(self.model, self.tx, init_rng,
                                               tuple(self.model.config.input_shape))
    else:
      self.state = step_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                       opt_state=self.tx.init(params))
    self._step = jax.jit(functools.partial(step_lib.train_step, model=self.model, tx=self.tx,
                                           schedule=self.schedule))

  def step(self, spectrogram: np.ndarray, noise: Optional[np.ndarray] = None) -> float:
    """One step; masks from `noise` (batch, L) or, when None, from the run's key."""
    kwargs = {} if noise is None else {"noise": noise}
    self.state, self.metrics = self._step(self.state, {"spectrogram": spectrogram}, self.rng,
                                          **kwargs)
    return float(self.metrics["loss"])

  def state_dict(self) -> dict[str, np.ndarray]:
    """The parameters under the original's key names."""
    return original.to_state_dict(self.state.params, self.model.config)


# --- Data. -----------------------------------------------------------------------------------------

class Batches:
  """Deterministic training batches (batch, 200, 80) float32 from the synthetic corpus."""

  def __init__(self, batch_size: int, num_clips: int = POOL_CLIPS, seed: int = 0):
    self.batch_size = batch_size
    self._seed = seed
    self._clips = [features.standardize(features.log_mel(synthetic.make_clip(i, seed)[0]))
                   for i in range(num_clips)]

  def __call__(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, step])
    chosen = rng.choice(len(self._clips), self.batch_size, replace=False)
    return np.stack([pipeline.crop(self._clips[i], MODEL_ARGS["img_size"][0], rng)
                     for i in chosen]).astype(np.float32)


# --- The comparisons. ----------------------------------------------------------------------------

def tensor_group(key: str) -> str:
  """The group of an original state-dict key: its sub-layer, block indices as '*'
  ('encoder.blocks.0.ffn2.linear1.weight' -> 'encoder.blocks.*.ffn2')."""
  parts = re.sub(r"\.\d+\.", ".*.", key).split(".")
  if "*" in parts:
    return ".".join(parts[:parts.index("*") + 2])
  return ".".join(parts[:-1]) if parts[-1] in ("weight", "bias") else key


def _pieces(key: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """(group, values) of one tensor; the attention's key bias is a group of its own."""
  group = tensor_group(key)
  if not key.endswith("qkv_layer.bias"):
    return [(group, array)]
  query, key_bias, value = np.split(array, 3)
  return [(group, np.concatenate([query, value])), (f"{group} key bias", key_bias)]


def parameter_differences(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]
                          ) -> dict[str, dict[str, float]]:
  """Per tensor group: `rel`, the largest max|ours - theirs| / max|theirs| over its tensors, and
  `abs`, the largest max|ours - theirs|.

  The attention's key bias is reported apart ('... key bias'): adding the same vector to every
  key shifts each query's logits by a constant, which softmax ignores, so its gradient is zero
  in exact arithmetic and what each side computes is rounding noise, which AdamW's normalised
  update turns into steps of the order of the learning rate on both sides, differently.
  """
  groups: dict[str, dict[str, float]] = {}
  for key, reference in theirs.items():
    for (group, values), (_, mine) in zip(_pieces(key, reference), _pieces(key, ours[key])):
      diff = float(np.max(np.abs(mine - values)))
      scale = float(np.max(np.abs(values))) or 1.0
      entry = groups.setdefault(group, {"rel": 0.0, "abs": 0.0})
      entry["rel"], entry["abs"] = max(entry["rel"], diff / scale), max(entry["abs"], diff)
  return groups


def lockstep(recipe: Recipe, original_dir: str, seed: int = 0,
             batches: Optional[Callable[[int], np.ndarray]] = None) -> dict[str, Any]:
  """Both trainers from the original's init, on the same batches and masking noise.

  Returns per-step `original` and `project` losses, `masks_equal`, the project's `grad_norm`
  (before clipping) and
  `param_diff` (`parameter_differences` after the last step).
  """
  import torch  # pylint: disable=g-import-not-at-top
  package = original_package(original_dir)
  model = original_model(package, seed, recipe.norm_pix_loss)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  model_config, variables = original.load(state, MODEL_ARGS)
  config = project_config(recipe, model_config)
  theirs = OriginalTrainer(package, model, recipe)
  ours = ProjectTrainer(config, recipe.num_train, params=variables["params"])
  batches = batches or Batches(recipe.batch_size)
  generator = torch.Generator().manual_seed(seed + 1)
  num_patches = ours.model.config.num_patches
  result = {"original": [], "project": [], "masks_equal": [], "grad_norm": []}
  for step in range(recipe.steps):
    x = batches(step)
    noise = torch.rand(recipe.batch_size, num_patches, generator=generator)
    loss, mask = theirs.step(step, x, noise)
    result["original"].append(loss)
    result["project"].append(ours.step(x, noise.numpy()))
    result["grad_norm"].append(float(ours.metrics["grad_norm"]))
    _, _, our_mask = models.masking_ids_from_noise(noise.numpy(), ours.model.config.num_keep)
    result["masks_equal"].append(bool(np.array_equal(np.asarray(our_mask), mask)))
  result["param_diff"] = parameter_differences(ours.state_dict(), theirs.state_dict())
  return result


def own_rng_runs(recipe: Recipe, original_dir: str, seeds: int,
                 batches: Callable[[int], np.ndarray]) -> dict[str, list[list[float]]]:
  """Per side, `seeds` runs with their own init and masks: losses per step."""
  package = original_package(original_dir)
  model_config = original.model_config_from_args(MODEL_ARGS)
  config = project_config(recipe, model_config)
  runs = {"original": [], "project": []}
  for seed in range(seeds):
    theirs = OriginalTrainer(package, original_model(package, seed, recipe.norm_pix_loss), recipe)
    runs["original"].append([theirs.step(s, batches(s))[0] for s in range(recipe.steps)])
    ours = ProjectTrainer(config, recipe.num_train, seed=seed)
    runs["project"].append([ours.step(batches(s)) for s in range(recipe.steps)])
  return runs


def curve_summary(runs: dict[str, list[list[float]]], every: int = 100) -> list[dict[str, Any]]:
  """At steps `every`, 2·`every`, ...: mean and sd over seeds of the loss averaged over the
  `WINDOW` steps up to it, per side, and whether the means differ by at most twice the pooled
  seed-to-seed sd."""
  steps = len(runs["original"][0])
  rows = []
  for end in range(every, steps + 1, every):
    row = {"step": end}
    for side, curves in runs.items():
      values = [statistics.fmean(c[end - WINDOW:end]) for c in curves]
      row[f"{side}_mean"] = statistics.fmean(values)
      row[f"{side}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    pooled = math.sqrt((row["original_sd"] ** 2 + row["project_sd"] ** 2) / 2)
    row["diff"] = row["project_mean"] - row["original_mean"]
    row["diff_over_sd"] = abs(row["diff"]) / pooled if pooled else math.inf
    row["within_spread"] = bool(abs(row["diff"]) <= 2 * pooled)
    rows.append(row)
  return rows


def lockstep_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  """Table rows of a lockstep result: step (1-based), losses, |diff|, |diff| / loss, masks."""
  rows = []
  for i, (theirs, ours) in enumerate(zip(result["original"], result["project"])):
    rows.append({"step": i + 1, "original": theirs, "project": ours, "abs": abs(ours - theirs),
                 "rel": abs(ours - theirs) / abs(theirs), "masks": result["masks_equal"][i]})
  return rows


def lockstep_verdicts(rows: list[dict[str, Any]]) -> list[tuple[str, float, float, bool]]:
  """(steps, worst |dloss| / loss, bound, met) for the bounds of `LOCKSTEP_BOUNDS`."""
  verdicts, start = [], 0
  for end, bound in LOCKSTEP_BOUNDS:
    span = rows[start:end]
    if not span:
      break
    worst = max(r["rel"] for r in span)
    verdicts.append((f"{span[0]['step']}-{span[-1]['step']}", worst, bound, worst <= bound))
    start = len(rows) if end is None else end
  return verdicts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  reason = missing_requirement(_ORIGINAL.value)
  if reason:
    print(f"train_parity: skipped: {reason}")
    return
  for name, value in (("steps", _STEPS.value), ("seed_steps", _SEED_STEPS.value)):
    if value % Recipe.epochs:
      raise app.UsageError(f"--{name}: expected a multiple of {Recipe.epochs}")
  env = common.environment()
  batches = Batches(_BATCH_SIZE.value)
  options = dict(batch_size=_BATCH_SIZE.value, peak_lr=_PEAK_LR.value,
                 grad_clip_norm=_GRAD_CLIP.value, norm_pix_loss=_NORM_PIX.value)
  start = time.perf_counter()
  recipe = Recipe(steps=_STEPS.value, **options)
  result = lockstep(recipe, _ORIGINAL.value, batches=batches)
  rows = lockstep_rows(result)
  lockstep_s = time.perf_counter() - start
  print(common.describe(env))
  print(f"\nLockstep: {recipe.steps} steps, batch {recipe.batch_size}, peak lr {recipe.peak_lr:g}, "
        f"clip {recipe.grad_clip_norm or 'none'}, norm_pix_loss {recipe.norm_pix_loss} "
        f"({lockstep_s:.0f} s)")
  print(common.table(rows, (("step", "step", "d"), ("original", "original loss", ".6f"),
                            ("project", "project loss", ".6f"), ("abs", "|diff|", ".2e"),
                            ("rel", "|diff| / loss", ".2e"),
                            ("masks", "same masks", lambda v: "yes" if v else "NO"))))
  verdicts = lockstep_verdicts(rows)
  for steps, worst, bound, met in verdicts:
    print(f"steps {steps}: max |diff| / loss {worst:.2e} (bound {bound:g}): "
          f"{'met' if met else 'MISSED'}")
  groups = sorted(result["param_diff"].items(), key=lambda kv: -kv[1]["rel"])
  print(f"\nParameters after {recipe.steps} steps, per tensor group: max over its tensors of "
        "max |project - original| / max |original| (rel.) and of max |project - original|:")
  print(common.table([{"group": g, **d} for g, d in groups],
                     (("group", "tensor group", "s"), ("rel", "max rel. diff", ".2e"),
                      ("abs", "max abs. diff", ".2e"))))
  print(KEY_BIAS_NOTE)
  record = {"benchmark": "train_parity", "environment": env, "model_args": MODEL_ARGS,
            "lockstep": {"recipe": dataclasses.asdict(recipe), "rows": rows,
                         "verdicts": verdicts, "param_diff": result["param_diff"],
                         "seconds": lockstep_s}}
  if _SEED_STEPS.value:
    start = time.perf_counter()
    recipe = Recipe(steps=_SEED_STEPS.value, **options)
    runs = own_rng_runs(recipe, _ORIGINAL.value, _SEEDS.value, batches)
    summary = curve_summary(runs)
    seeds_s = time.perf_counter() - start
    print(f"\nOwn RNG: {_SEEDS.value} seeds per side, {recipe.steps} steps, same batches; loss "
          f"averaged over the {WINDOW} steps up to each step, mean +- sd over seeds "
          f"({seeds_s:.0f} s)")
    pm = lambda side: lambda r: f"{r[f'{side}_mean']:.4f} +- {r[f'{side}_sd']:.4f}"
    print(common.table([{**r, "o": r, "p": r} for r in summary],
                       (("step", "step", "d"), ("o", "original", pm("original")),
                        ("p", "project", pm("project")), ("diff", "project - original", "+.4f"),
                        ("diff_over_sd", "|diff| / pooled sd", ".2f"),
                        ("within_spread", "within 2 sd", lambda v: "yes" if v else "NO"))))
    record["own_rng"] = {"recipe": dataclasses.asdict(recipe), "seeds": _SEEDS.value,
                         "window": WINDOW, "summary": summary, "losses": runs,
                         "seconds": seeds_s}
  common.write_json(_OUTPUT.value, record)


if __name__ == "__main__":
  app.run(main)
