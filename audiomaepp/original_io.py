"""The original AudioMAE++ project's files: reading checkpoints, run directories and config files;
writing checkpoints its code loads (`write_checkpoint`).

Checkpoints are read without running pickled code: `.pth` files go through
`torch.load(weights_only=True)` with only `argparse.Namespace` and `ml_collections.ConfigDict`
(the original trainer's saved `args` and its `args.config`) allowed besides tensors. Config files
are parsed (`ast`), never imported, so neither the original code nor its `.common` module is
needed. Written checkpoints carry the builder that makes their model (`arch`, `model_args`), so
they import back without further flags.
"""
import argparse
import ast
import dataclasses
import json
import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from typing import Any, Optional

from absl import logging
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from audiomaepp import errors
from audiomaepp.errors import UserError
from audiomaepp.models.config import ENCODER_SIZES

CHECKPOINT_DIR = "checkpoints"
# Export format -> the file suffixes it is written with.
FORMATS = {"original": (".pth", ".pt"), "safetensors": (".safetensors",)}
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pth$")
_DDP_PREFIX = "module."
# The original's builders (`mae_plusplus_<size>`; `mae_<size>` for vanilla blocks) take the
# encoder size from their name and apply these defaults before the constructor's own.
_BUILDER = re.compile(r"mae_(?:plusplus_)?(" + "|".join(ENCODER_SIZES) + r")$")
_BUILDER_DEFAULTS = {"img_size": [200, 80], "patch_size": [4, 16], "decoder_num_heads": 6,
                     "decoder_depth": 4, "decoder_embed_dim": 384}
_SIZE_ARGS = ("embed_dim", "depth", "num_heads")
# `MAE_PlusPlus`, the class the builders call, may be named as `arch` itself: its own defaults.
CONSTRUCTOR = "MAE_PlusPlus"
_CONSTRUCTOR_DEFAULTS = {"img_size": [200, 80], "patch_size": [4, 16], "embed_dim": 768,
                         "depth": 12, "num_heads": 12, "decoder_embed_dim": 384,
                         "decoder_depth": 4, "decoder_num_heads": 8}


@dataclasses.dataclass(frozen=True)
class OriginalCheckpoint:
  """An original state dict as float32 arrays, with what the file said about itself."""
  state: dict[str, np.ndarray]
  eps: dict[str, float]  # machine epsilon of each tensor's stored dtype (0 for integers)
  source: str  # the file read, or 'mapping'
  original_args: Optional[dict[str, Any]]  # builder arguments from the saved trainer args


def builder_args(arch: str, model_args: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The constructor arguments the original builder `arch` makes from `model_args`."""
  if arch == CONSTRUCTOR:
    return {**_CONSTRUCTOR_DEFAULTS, **model_args}
  match = _BUILDER.match(str(arch))
  if not match:
    raise UserError(f"{where}: model.arch={arch!r} is not an original builder; expected "
                    f"{CONSTRUCTOR}, mae_plusplus_<size> or mae_<size>, size one of {list(ENCODER_SIZES)}")
  sizes = dict(zip(_SIZE_ARGS, ENCODER_SIZES[match.group(1)]))
  clash = sorted(k for k in _SIZE_ARGS if k in model_args)
  if clash:
    raise UserError(f"{where}: model_args set {clash}, which the builder {arch} fixes itself")
  return {**_BUILDER_DEFAULTS, **model_args, **sizes}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
  """An official config file (`get_config()` setting `config.model.arch` and
  `config.model.model_args`) -> the original constructor arguments, without importing it."""
  path = pathlib.Path(path)
  try:
    tree = ast.parse(path.read_text(), str(path))
  except (OSError, SyntaxError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read the config file ({e})") from None
  found = {}
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    name = ast.unparse(node.targets[0])
    field = name.split(".", 1)[-1]
    if field not in ("model.arch", "model.model_args"):
      continue
    value = node.value
    if isinstance(value, ast.Call) and len(value.args) == 1 and not value.keywords:
      value = value.args[0]  # ConfigDict({...})
    try:
      found[field] = ast.literal_eval(value)
    except ValueError:
      raise UserError(f"{path}:{node.lineno}: {name} is not a literal value; write the "
                      "arguments out or pass them as --original_args=JSON") from None
  if "model.arch" not in found:
    raise UserError(f"{path}: no `config.model.arch = ...` found; expected an official "
                    "AudioMAE++ config file (get_config() setting model.arch and model.model_args)")
  model_args = found.get("model.model_args", {})
  if not isinstance(model_args, Mapping):
    raise UserError(f"{path}: config.model.model_args must be a dict, got {model_args!r}")
  return builder_args(found["model.arch"], dict(model_args), str(path))


def newest_checkpoint(run_dir: str | os.PathLike) -> pathlib.Path:
  """The highest-numbered `checkpoints/checkpoint-<epoch>.pth` of an original run directory."""
  run_dir = pathlib.Path(run_dir)
  candidates = {}
  for folder in (run_dir / CHECKPOINT_DIR, run_dir):
    if folder.is_dir():
      for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match:
          candidates.setdefault(int(match.group(1)), path)
  if not candidates:
    raise UserError(f"{run_dir}: no {CHECKPOINT_DIR}/checkpoint-<epoch>.pth in this directory; "
                    "expected an original run directory or a checkpoint file")
  epoch = max(candidates)
  logging.warning("%s: using the newest checkpoint %s (epoch %d of %d found)", run_dir,
                  candidates[epoch].name, epoch, len(candidates))
  return candidates[epoch]


def _torch_load(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.torch_required(f"reading {path}") from None
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: the file is empty (0 bytes); expected a PyTorch checkpoint")
  allowed = [argparse.Namespace, ml_collections.ConfigDict]
  try:
    with torch.serialization.safe_globals(allowed):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    try:
      unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # pylint: disable=broad-except
      unsafe = None  # not a zip checkpoint at all
    if not unsafe:
      detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
      raise UserError(f"{path}: not a PyTorch checkpoint torch can read ({detail})") from None
    raise UserError(f"{path}: holds objects other than tensors and the original trainer's args "
                    f"({', '.join(unsafe)}); refusing to unpickle them") from None
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: not a PyTorch checkpoint torch can read "
                    f"({type(e).__name__}: {e})") from None


def _unwrap(checkpoint: Any, source: str) -> tuple[Mapping[str, Any], Optional[dict[str, Any]]]:
  """(state dict, builder arguments it records or None) of a bare state dict or a container."""
  if not isinstance(checkpoint, Mapping):
    raise UserError(f"{source}: expected a state dict or a dict holding one, got "
                    f"{type(checkpoint).__name__}")
  for key in ("model", "state_dict"):
    if isinstance(checkpoint.get(key), Mapping):
      if isinstance(checkpoint.get("arch"), str):  # written by `write_checkpoint`
        return checkpoint[key], builder_args(checkpoint["arch"],
                                             dict(checkpoint.get("model_args") or {}), source)
      return checkpoint[key], _saved_args(checkpoint.get("args"), source)
  return checkpoint, None


def _saved_args(args: Any, source: str) -> Optional[dict[str, Any]]:
  """Builder arguments from the original trainer's `args.config.model`, when it holds them."""
  model = getattr(getattr(args, "config", None), "model", None)
  if model is None or "arch" not in model:
    return None
  model_args = model.get("model_args") or {}
  if hasattr(model_args, "to_dict"):
    model_args = model_args.to_dict()
  return builder_args(model.arch, dict(model_args), f"{source} (saved args.config)")


def read_checkpoint(weights: Mapping[str, Any] | str | os.PathLike) -> OriginalCheckpoint:
  """An original checkpoint: a mapping, `.npz`, `.safetensors`, `.pth` (bare state dict,
  `{'model': ...}` with the trainer's optimizer/epoch/scaler/args, or `{'state_dict': ...}`) or a
  run directory."""
  if isinstance(weights, Mapping):
    source, checkpoint = "mapping", weights
  else:
    source = os.fspath(weights)
    if os.path.isdir(source):
      source = os.fspath(newest_checkpoint(source))
    if not os.path.isfile(source):
      raise UserError(f"{source}: no such file or directory")
    if source.endswith(".npz"):
      with np.load(source) as data:
        checkpoint = {k: data[k] for k in data.files}
    elif source.endswith(".safetensors"):
      checkpoint = _safetensors_load(source)
    elif source.endswith((".pth", ".pt")):
      checkpoint = _torch_load(source)
    else:
      raise UserError(f"{source}: expected a .pth, .pt, .safetensors or .npz file, or an "
                      "original run directory")
  state, saved_args = _unwrap(checkpoint, source)
  arrays, eps = {}, {}
  for key, value in state.items():
    if hasattr(value, "detach"):  # a torch tensor, possibly float16 or bfloat16
      eps[key] = _torch_eps(value.dtype)
      value = value.detach().cpu().float().numpy()
    elif isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "fiub":
      eps[key] = float(np.finfo(value.dtype).eps) if value.dtype.kind == "f" else 0.0
    else:
      raise UserError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor; expected a "
                      "state dict, {'model': state dict, ...} or {'state_dict': state dict}")
    arrays[key] = np.asarray(value, np.float32)
  if not arrays:
    raise UserError(f"{source}: the state dict is empty")
  if all(k.startswith(_DDP_PREFIX) for k in arrays):
    logging.warning("%s: stripped the DistributedDataParallel prefix %r from all %d keys",
                    source, _DDP_PREFIX, len(arrays))
    arrays = {k[len(_DDP_PREFIX):]: v for k, v in arrays.items()}
    eps = {k[len(_DDP_PREFIX):]: v for k, v in eps.items()}
  return OriginalCheckpoint(arrays, eps, source, saved_args)


def _safetensors_load(path: str) -> dict[str, Any]:
  """A `.safetensors` file as `{'model': arrays}`, with the builder of its metadata if any."""
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
    state = safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
  if "arch" not in metadata:
    return state
  try:
    model_args = json.loads(metadata.get("model_args", "{}"))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: the metadata's model_args is not JSON ({e})") from None
  return {"model": state, "arch": metadata["arch"], "model_args": model_args}


def write_checkpoint(path: str | os.PathLike, state: Mapping[str, np.ndarray], arch: str,
                     model_args: Mapping[str, Any], file_format: str) -> None:
  """Writes an original state dict (key -> float32 array) with the builder that makes its model.

  'original': a `.pth` like the original trainer's, `{'model': state dict, 'arch', 'model_args'}`
  (plain values only, so `torch.load(weights_only=True)` reads it and the original's
  `model.load_state_dict(checkpoint['model'])` loads it; needs PyTorch). 'safetensors': the same
  names and arrays, `arch` and `model_args` (JSON) in the metadata; any framework reads it. The
  file appears complete or not at all.
  """
  if file_format not in FORMATS:
    raise UserError(f"format {file_format!r}: expected one of {list(FORMATS)}")
  path = os.fspath(path)
  partial = f"{path}.partial"
  try:
    if file_format == "safetensors":
      safetensors.numpy.save_file(dict(state), partial, metadata={
          "format": "pt", "arch": arch, "model_args": json.dumps(dict(model_args))})
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise errors.torch_required("--format=original (a .pth file)") from None
      torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                  "arch": arch, "model_args": dict(model_args)}, partial)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _torch_eps(dtype: Any) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
