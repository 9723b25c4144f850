r"""Training with this project vs the official AudioMAE++ trainer's own code, on CPU in float32.

    python benchmarks/train_parity.py [--steps=100] [--batch_size=8] [--peak_lr=3e-3] \
        [--grad_clip_norm=0] [--norm_pix_loss] [--original=../shared/original] [--output=FILE]

Lockstep runs of a micro AudioMAE++ (width 64, depth 2, 4 heads; decoder width 64, depth 1,
4 heads; transformer++ blocks with SwiGLU; input 200 x 80, patches 4 x 80, mask ratio 0.8) in two
configurations (`CONFIGURATIONS`): without RoPE, and with the original's RoPE in encoder and
decoder (`encoder_use_rope`, `decoder_use_rope`; this project's `encoder_rope` and
`decoder_rope` = 'sequence'). A patch spans all 80 mel bins so that the model learns within the
compared steps: the visible patches' mean spectrum predicts a masked patch far better than zero
(the loss of a zero prediction, printed beside the losses, is the plateau a model reaches by
predicting the clip mean). With the paper's 16-bin patches the decoder, which sees only the
original's 1-D sin-cos positions, first has to learn which visible patches share a masked
patch's frequency band, and the loss stays on that plateau for hundreds of steps.

The original side is the official trainer's code, unmodified (`audiomaepp_original` in
`--original`): `mae_engine.train_mae`, called once per epoch as the official entry point
(`train_mae_spec.py`) calls it, sets the learning rate with `lr_sched`, runs the
forward pass under its autocast, the criterion, `misc.NativeScalerWithGradNormCount` (backward,
optional clipping, `optimizer.step()`) and `zero_grad`. It is handed what the entry point hands
it:
- the model built and initialised by the original's `MAE_PlusPlus` under
  `torch.manual_seed(seed)`;
- AdamW with betas (0.9, 0.95) on the parameter groups of timm's
  `param_groups_weight_decay(model, weight_decay)` (written out here, `param_groups_weight_decay`:
  timm is not needed otherwise), lr = learning_rate x batch_size / 256;
- the criterion `functools.partial(loss.mae_loss, norm_pix_loss=...)`, wrapped to record each
  loss and mask it returns (`RecordingCriterion`; `train_mae` keeps its losses to itself and
  returns their epoch mean, which is checked against the record);
- `args` as the entry point fills them: precision 'float32', accum_iter 1, clip_grad_value None
  (or `--grad_clip_norm`), steps_per_epoch, epochs, warmup_epochs, min_lr.
One piece is replaced: `utilities.Prefetcher` needs CUDA streams, so `IteratorPrefetcher` takes
its place for the call (the same (input, label) pairs in the same order, without the copy to a
GPU). Run as the code runs on a machine without CUDA, not stubbed:
`torch.autocast(device_type='cuda', enabled=False)` (precision float32) does nothing, and the
scaler's `torch.amp.GradScaler()` disables itself (its warning is silenced). With CUDA it would
multiply the loss by 2^16 and divide the gradients by it again, exact in binary floating point,
and skip a step whose gradients are not finite; none is here (a non-finite gradient would make
the parameters, and so every later loss, non-finite).

Masking noise: the original's `random_masking` draws `torch.rand(N, L)` from torch's global
generator, continuing after the initialisation. This side copies the generator's state before
training, draws the same numbers from the copy and hands them to `train.step.train_step(...,
noise=...)`. After every epoch the global generator's state must equal the copy's (so nothing
else drew from it) and the masks the criterion saw must equal this project's.

The project side starts from the original's initial weights (imported with `original.load`, as
`tools.import_original` does), with the optimiser and schedule the trainer builds
(`train.optim`), on the same batches. Printed per configuration: both losses at steps 1, 10, 50,
100, their relative difference and the zero-prediction loss, then the verdicts of the bounds
(`parity_verdicts`: per-step loss differences, masks, noise stream, parameters;
`learning_verdicts`: the loss drop and the distance from the plateau); then per tensor group the
largest parameter difference after the last step. The exit status is 1 when a bound fails.
PyTorch runs on one thread: on a shared 2-core machine its thread pool otherwise spins against
the other processes (4 to 5 times slower at load 4).

The recipe scales the official one (100 epochs, 10 of warm-up) to the run: an "epoch" is
`steps / 10` steps, warm-up 1 epoch, half cosine to 0 after it.

Batches: clips of the built-in synthetic corpus (`data.synthetic.make_clip`), log-mel, each
clip standardised, 200-frame crops at offsets drawn per step (NumPy, seeded by the step).
Needs PyTorch, einops and rotary-embedding-torch and the original's code (`../shared/original`,
MIT licence, not part of the project); without them it prints why and exits 0.
"""
import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import os
import re
import sys
import time
from typing import Any, Callable, Optional
from unittest import mock
import warnings

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

_STEPS = flags.DEFINE_integer("steps", 100, "Lockstep steps per configuration (a multiple of 10).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size of every step.")
_PEAK_LR = flags.DEFINE_float("peak_lr", 3e-3, "Peak learning rate (learning_rate x batch / 256).")
_GRAD_CLIP = flags.DEFINE_float("grad_clip_norm", 0.0, "Global-norm clipping (0: none, as the "
                                "official configs).")
_NORM_PIX = flags.DEFINE_bool("norm_pix_loss", False, "Per-patch normalised targets.")
_ORIGINAL = flags.DEFINE_string("original", os.path.join(REPO, "..", "shared", "original"),
                                "Directory holding the original's package audiomaepp_original.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")

# The original constructor's arguments of the micro model (`MAE_PlusPlus`), without RoPE; one
# patch per time step (4 frames x 80 mel bins), see the module docstring.
MODEL_ARGS = dict(
    img_size=(200, 80), patch_size=(4, 80), in_chans=1, embed_dim=64, depth=2, num_heads=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4, mask_ratio=0.8,
    use_cls_token=True, encoder_plusplus_block=True, decoder_plusplus_block=True,
    encoder_use_swiglu_final_ffn=True, decoder_use_swiglu_final_ffn=True,
    encoder_use_rope=False, decoder_use_rope=False)
CONFIGURATIONS = {
    "no RoPE": MODEL_ARGS,
    "RoPE (sequence)": {**MODEL_ARGS, "encoder_use_rope": True, "decoder_use_rope": True},
}
POOL_CLIPS = 64  # synthetic clips the batches are cropped from
TABLE_STEPS = (1, 10, 50, 100)
LOSS_BOUNDS = ((10, 1e-4), (None, 1e-3))  # (up to step, max |dloss| / loss); None: the rest
PARAM_BOUND = 1e-4  # max |ours - theirs| / max |theirs| per tensor, all but the key bias
KEY_BIAS_BOUND = 1e-3  # max |ours - theirs| of the attention's key bias (absolute)
MIN_DROP = 0.3  # the loss of the last DROP_WINDOW steps at least this far below step 1's
MAX_PLATEAU_RATIO = 0.8  # ... and at most this fraction of the zero-prediction loss
DROP_WINDOW = 10
KEY_BIAS_NOTE = (
    "Key bias: the middle third of the qkv bias, added to every key. Without RoPE it shifts each "
    "query's logits by one constant, which softmax ignores: its gradient is zero in exact "
    "arithmetic, and what each side computes is rounding noise of its own, far below AdamW's "
    "eps: each step moves it by a small fraction of the learning rate in a direction of its own "
    "on each side, so it stays tiny and any difference is of the order of the values: a "
    "relative bound is meaningless. The absolute bound is far below the size a trained key bias "
    "reaches (with RoPE), so a key bias trained on one side only fails it. With RoPE the keys "
    "are rotated by their positions after the bias is added and the bias has a true gradient, "
    "but the pairs of the lowest rotary frequencies turn by at most 0.05 rad over the "
    "sequence, so their gradient is nearly zero and their relative error is amplified as well: "
    "the same absolute bound applies.")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The optimisation of one comparison, in the official config's terms."""
  batch_size: int
  steps: int
  peak_lr: float = 3e-3
  epochs: int = 10  # the official 100 epochs, 10 of warm-up, scaled to `steps`
  warmup_epochs: int = 1
  min_lr: float = 0.0
  weight_decay: float = 0.05
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
      return (f"{module} is not installed (pip install -r requirements-torch.txt, "
              "or .venv/bin/pip install -e '.[torch]')")
  return ""


def official_module(original_dir: str, name: str):
  """`audiomaepp_original.NAME` of the original's code in `original_dir` (e.g. 'lr_sched',
  which needs no torch, or 'mae_engine')."""
  path = os.path.abspath(original_dir)
  if path not in sys.path:
    sys.path.insert(0, path)
  return importlib.import_module(f"audiomaepp_original.{name}")


def original_model(original_dir: str, model_args: dict[str, Any], seed: int):
  """The model as the original builds and initialises it under `torch.manual_seed(seed)`."""
  import torch  # pylint: disable=g-import-not-at-top
  package = official_module(original_dir, "models")
  torch.manual_seed(seed)
  with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice about its patch layout
    return package.MAE_PlusPlus(**model_args)


# --- The official trainer, driven as its entry point drives it. -----------------------------------

def param_groups_weight_decay(model, weight_decay: float) -> list[dict[str, Any]]:
  """timm's `optim_factory.param_groups_weight_decay(model, weight_decay)`, which the official
  entry point builds its AdamW from: trainable tensors of at most one dimension and names ending
  in '.bias' get no weight decay, the others `weight_decay`."""
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


def official_args(recipe: Recipe) -> argparse.Namespace:
  """The fields of the entry point's `args` that `train_mae` and `lr_sched` read, as it fills
  them for one process (world size 1) without gradient accumulation."""
  accum_iter, world_size = 1, 1
  return argparse.Namespace(
      accum_iter=accum_iter, precision="float32", print_freq=100,
      clip_grad_value=recipe.grad_clip_norm or None,
      lr=accum_iter * recipe.learning_rate * recipe.batch_size * world_size / 256.0,
      min_lr=recipe.min_lr, warmup_epochs=recipe.warmup_epochs, epochs=recipe.epochs,
      steps_per_epoch=recipe.steps_per_epoch, global_bs=recipe.batch_size * world_size)


class IteratorPrefetcher:
  """`utilities.Prefetcher` without CUDA streams: the loader's (input, label) pairs in order,
  (None, None) after the last, as the original's `next()` returns them."""

  def __init__(self, loader, device):
    del device  # the pairs are CPU tensors already
    self._pairs = iter(loader)

  def next(self):
    return next(self._pairs, (None, None))


class RecordingCriterion:
  """The official criterion, `functools.partial(mae_loss, norm_pix_loss=...)`, recording each
  loss it returns, the mask it was given and the loss a zero prediction would have had."""

  def __init__(self, mae_loss: Callable[..., Any], norm_pix_loss: bool):
    self._loss = functools.partial(mae_loss, norm_pix_loss=norm_pix_loss)
    self.losses, self.masks, self.zero_losses = [], [], []

  def __call__(self, pred, target, mask):
    import torch  # pylint: disable=g-import-not-at-top
    loss = self._loss(pred, target, mask)
    self.losses.append(loss.item())
    self.masks.append(mask.detach().numpy().copy())
    with torch.no_grad():
      self.zero_losses.append(self._loss(torch.zeros_like(pred), target, mask).item())
    return loss


class OfficialRun:
  """The official `mae_engine.train_mae`, one call per epoch, with the entry point's optimiser,
  loss scaler, criterion and args."""

  def __init__(self, original_dir: str, model, recipe: Recipe):
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self._engine = official_module(original_dir, "mae_engine")
    self._utilities = official_module(original_dir, "utilities")
    misc = official_module(original_dir, "misc")
    self.model = model
    self.recipe = recipe
    self.args = official_args(recipe)
    self.criterion = RecordingCriterion(official_module(original_dir, "loss").mae_loss,
                                        recipe.norm_pix_loss)
    self.optimizer = torch.optim.AdamW(param_groups_weight_decay(model, recipe.weight_decay),
                                       lr=self.args.lr, betas=(0.9, 0.95))
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "torch.cuda.amp.GradScaler is enabled, but CUDA")
      self.loss_scaler = misc.NativeScalerWithGradNormCount()
    self.total_steps = 0

  def epoch(self, epoch: int, spectrograms: list[np.ndarray]) -> list[float]:
    """`train_mae` for `epoch` on these batches (batch, time, mel); returns its per-step losses
    (also in `criterion`)."""
    torch = self._torch
    pairs = [(torch.from_numpy(x)[:, None], torch.zeros(len(x))) for x in spectrograms]
    first = len(self.criterion.losses)
    with mock.patch.object(self._utilities, "Prefetcher", IteratorPrefetcher), \
        contextlib.redirect_stdout(io.StringIO()):  # it prints every step's metrics
      stats, self.total_steps = self._engine.train_mae(
          pairs, self.model, self.criterion, self.optimizer, epoch, len(pairs),
          torch.device("cpu"), self.loss_scaler, self.args, None, self.total_steps)
    losses = self.criterion.losses[first:]
    if len(losses) != len(pairs) or stats["loss"] != sum(losses) / len(losses):
      raise AssertionError(f"epoch {epoch}: train_mae's mean loss {stats['loss']} is not the mean "
                           f"of the {len(losses)} losses its criterion returned")
    return losses

  def state_dict(self) -> dict[str, np.ndarray]:
    """The parameters, trained and frozen (sin-cos tables, RoPE frequencies), by key name."""
    return {name: p.detach().numpy().copy() for name, p in self.model.named_parameters()}


# --- This project's side. -------------------------------------------------------------------------

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
  config.b1, config.b2 = 0.9, 0.95
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


# --- Data. ----------------------------------------------------------------------------------------

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


# --- The comparison. ------------------------------------------------------------------------------

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
  """Per tensor group of `theirs`: `rel`, the largest
  max|ours - theirs| / max|theirs| over its tensors, `abs`, the largest max|ours - theirs|, and
  `max`, the largest max|theirs| (the attention's key bias is a group of its own:
  `KEY_BIAS_NOTE`)."""
  if set(theirs) - set(ours):
    raise AssertionError(f"tensors missing here: {sorted(set(theirs) - set(ours))}")
  groups: dict[str, dict[str, float]] = {}
  for key, reference in theirs.items():
    for (group, values), (_, mine) in zip(_pieces(key, reference), _pieces(key, ours[key])):
      diff = float(np.max(np.abs(mine - values)))
      size = float(np.max(np.abs(values)))
      entry = groups.setdefault(group, {"rel": 0.0, "abs": 0.0, "max": 0.0})
      entry["rel"] = max(entry["rel"], diff / size if size else (0.0 if diff == 0 else np.inf))
      entry["abs"], entry["max"] = max(entry["abs"], diff), max(entry["max"], size)
  return groups


def lockstep(recipe: Recipe, original_dir: str, model_args: dict[str, Any] = MODEL_ARGS,
             seed: int = 0, batches: Optional[Callable[[int], np.ndarray]] = None
             ) -> dict[str, Any]:
  """The official `train_mae` and this project's `train_step` from the original's init, on the
  same batches and masking noise.

  Returns per step the `original` and `project` losses, `zero_loss` (the criterion's loss of a
  zero prediction), `masks_equal` and the project's `grad_norm` (before clipping); per epoch
  `noise_stream_equal` (torch's global generator where the copy is); after the last step
  `param_diff` (`parameter_differences`).
  """
  import torch  # pylint: disable=g-import-not-at-top
  model = original_model(original_dir, model_args, seed)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  model_config, variables = original.load(state, model_args)
  ours = ProjectTrainer(project_config(recipe, model_config), recipe.num_train,
                        params=variables["params"])
  theirs = OfficialRun(original_dir, model, recipe)
  batches = batches or Batches(recipe.batch_size)
  noise_stream = torch.Generator()
  noise_stream.set_state(torch.get_rng_state())  # where the original's masking draws start
  shape = (recipe.batch_size, ours.model.config.num_patches)
  result = {"project": [], "masks_equal": [], "grad_norm": [], "noise_stream_equal": []}
  for epoch in range(recipe.epochs):
    steps = range(epoch * recipe.steps_per_epoch, (epoch + 1) * recipe.steps_per_epoch)
    spectrograms = [batches(s) for s in steps]
    noises = [torch.rand(shape, generator=noise_stream).numpy() for _ in steps]
    theirs.epoch(epoch, spectrograms)
    result["noise_stream_equal"].append(
        bool(torch.equal(torch.get_rng_state(), noise_stream.get_state())))
    for x, noise, their_mask in zip(spectrograms, noises, theirs.criterion.masks[steps[0]:]):
      result["project"].append(ours.step(x, noise))
      result["grad_norm"].append(float(ours.metrics["grad_norm"]))
      _, _, our_mask = models.masking_ids_from_noise(noise, ours.model.config.num_keep)
      result["masks_equal"].append(bool(np.array_equal(np.asarray(our_mask), their_mask)))
  result["original"] = theirs.criterion.losses
  result["zero_loss"] = theirs.criterion.zero_losses
  result["param_diff"] = parameter_differences(ours.state_dict(), theirs.state_dict())
  return result


def lockstep_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  """Per step (1-based): losses, |diff|, |diff| / loss, zero-prediction loss, masks equal."""
  rows = []
  for i, (theirs, ours) in enumerate(zip(result["original"], result["project"])):
    rows.append({"step": i + 1, "original": theirs, "project": ours, "abs": abs(ours - theirs),
                 "rel": abs(ours - theirs) / abs(theirs), "zero_loss": result["zero_loss"][i],
                 "masks": result["masks_equal"][i]})
  return rows


def loss_drop(losses: list[float]) -> float:
  """1 - (mean loss of the last `DROP_WINDOW` steps) / (step 1's loss)."""
  return 1.0 - float(np.mean(losses[-DROP_WINDOW:])) / losses[0]


def plateau_ratio(result: dict[str, Any]) -> float:
  """Official loss / zero-prediction loss, both summed over the last `DROP_WINDOW` steps."""
  return sum(result["original"][-DROP_WINDOW:]) / sum(result["zero_loss"][-DROP_WINDOW:])


def parity_verdicts(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
  """(what, value, bound, met) of the parity bounds on one lockstep result: the per-step loss
  bounds of `LOSS_BOUNDS`, masks, noise stream and the parameter groups (`KEY_BIAS_NOTE`)."""
  rows = lockstep_rows(result)
  out, start = [], 0
  for end, bound in LOSS_BOUNDS:
    span = rows[start:end]
    if span:
      worst = max(r["rel"] for r in span)
      out.append((f"max |dloss| / loss, steps {span[0]['step']}-{span[-1]['step']}", worst,
                  bound, worst <= bound))
    start = len(rows) if end is None else end
  masks = sum(not equal for equal in result["masks_equal"])
  out.append(("steps whose masks differ", masks, 0, masks == 0))
  streams = sum(not equal for equal in result["noise_stream_equal"])
  out.append(("epochs after which torch's generator is elsewhere", streams, 0, streams == 0))
  diffs = result["param_diff"]
  key_bias = [g for g in diffs if g.endswith("key bias")]
  others = [g for g in diffs if g not in key_bias]
  worst = max(others, key=lambda g: diffs[g]["rel"])
  out.append((f"params: max rel. diff ({worst})", diffs[worst]["rel"], PARAM_BOUND,
              diffs[worst]["rel"] <= PARAM_BOUND))
  worst = max(key_bias, key=lambda g: diffs[g]["abs"])
  out.append((f"params: max abs. diff ({worst})", diffs[worst]["abs"], KEY_BIAS_BOUND,
              diffs[worst]["abs"] <= KEY_BIAS_BOUND))
  return out


def learning_verdicts(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
  """(what, value, bound, met): the official run's loss drop from step 1 and its distance from
  the zero-prediction plateau, over the last `DROP_WINDOW` steps."""
  drop, ratio = loss_drop(result["original"]), plateau_ratio(result)
  return [(f"loss drop (last {DROP_WINDOW} steps vs step 1)", drop, MIN_DROP, drop >= MIN_DROP),
          (f"loss / zero-prediction loss (last {DROP_WINDOW} steps)", ratio, MAX_PLATEAU_RATIO,
           ratio <= MAX_PLATEAU_RATIO)]


def run_configurations(recipe: Recipe, original_dir: str,
                       configurations: dict[str, dict[str, Any]] = CONFIGURATIONS
                       ) -> dict[str, dict[str, Any]]:
  """`lockstep` of every configuration, with its `verdicts` (parity and learning) and
  `seconds`."""
  batches = Batches(recipe.batch_size)
  results = {}
  for name, model_args in configurations.items():
    start = time.perf_counter()
    result = lockstep(recipe, original_dir, model_args, batches=batches)
    result["seconds"] = time.perf_counter() - start
    result["verdicts"] = parity_verdicts(result) + learning_verdicts(result)
    results[name] = result
  return results


def parameter_table(results: dict[str, dict[str, Any]]) -> str:
  """The parameter differences of every configuration side by side, per tensor group, the
  group with the largest relative difference first."""
  diffs = {name: result["param_diff"] for name, result in results.items()}
  groups = sorted({g for d in diffs.values() for g in d},
                  key=lambda g: (-max(d[g]["rel"] for d in diffs.values() if g in d), g))
  columns = [("group", "tensor group", "s")]
  for i, name in enumerate(diffs):
    columns += [(f"rel{i}", f"{name} rel.", ".2e"), (f"abs{i}", f"{name} abs.", ".2e")]
  rows = [{"group": g, **{f"{k}{i}": d[g][k] for i, d in enumerate(diffs.values()) if g in d
                          for k in ("rel", "abs")}} for g in groups]
  return common.table(rows, columns)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  reason = missing_requirement(_ORIGINAL.value)
  if reason:
    print(f"train_parity: skipped: {reason}")
    return 0
  if _STEPS.value % Recipe.epochs:
    raise app.UsageError(f"--steps: expected a multiple of {Recipe.epochs}")
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # see the module docstring
  env = common.environment()
  recipe = Recipe(steps=_STEPS.value, batch_size=_BATCH_SIZE.value, peak_lr=_PEAK_LR.value,
                  grad_clip_norm=_GRAD_CLIP.value, norm_pix_loss=_NORM_PIX.value)
  start = time.perf_counter()
  results = run_configurations(recipe, _ORIGINAL.value)
  seconds = time.perf_counter() - start
  print(common.describe(env))
  print(f"Lockstep, the official train_mae vs train.step.train_step: {recipe.steps} steps, batch "
        f"{recipe.batch_size}, peak lr {recipe.peak_lr:g}, clip {recipe.grad_clip_norm or 'none'}"
        f", norm_pix_loss {recipe.norm_pix_loss}; {seconds:.0f} s, load at the end "
        + "/".join(f"{x:.1f}" for x in os.getloadavg()))
  failed = False
  for name, result in results.items():
    rows = lockstep_rows(result)
    shown = [r for r in rows if r["step"] in TABLE_STEPS or r["step"] == len(rows)]
    print(f"\n{name} ({result['seconds']:.0f} s)")
    print(common.table(shown, (("step", "step", "d"), ("original", "official loss", ".6f"),
                               ("project", "project loss", ".6f"),
                               ("rel", "|diff| / loss", ".2e"),
                               ("zero_loss", "zero-prediction loss", ".4f"))))
    for what, value, bound, met in result["verdicts"]:
      print(f"{what}: {value:.3g} (bound {bound:g}): {'met' if met else 'FAILED'}")
      failed |= not met
  print(f"\nParameters after {recipe.steps} steps, per tensor group: max over its tensors of "
        "max |project - official| / max |official| (rel.) and max |project - official| (abs.); "
        "n/a: not in that configuration")
  print(parameter_table(results))
  print(KEY_BIAS_NOTE)
  common.write_json(_OUTPUT.value, {
      "benchmark": "train_parity", "environment": env, "recipe": dataclasses.asdict(recipe),
      "seconds": seconds, "configurations": {
          name: {"model_args": CONFIGURATIONS[name], "rows": lockstep_rows(result),
                 **{k: result[k] for k in ("verdicts", "param_diff", "noise_stream_equal",
                                           "seconds")}}
          for name, result in results.items()}})
  return int(failed)


if __name__ == "__main__":
  app.run(main)
