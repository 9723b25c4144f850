"""Compatibility with the original PyTorch AudioMAE++ implementation and its checkpoints.

`load(weights, original_args)` turns an original state dict plus the original builder's keyword
arguments into `(model_config, variables)` for `audiomaepp.models.build_model`. Every original
key maps to exactly one of our parameters (`state_dict_names`), except the fixed sin-cos tables,
which are checked against ours rather than loaded. (RoPE frequencies, also fixed in training,
are loaded: the original uses its stored values.) Reading the original's files (checkpoints, run
directories, config files) is `original_io`'s part; PyTorch is needed only for `.pth` files
(`pip install -e '.[torch]'`). `builder` and `export_state_dict` go the other way: what the
original's builders need to load our parameters (`tools.export`).
"""
import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Tuple, Union

from absl import logging
import jax.numpy as jnp
import ml_collections
import numpy as np

from audiomaepp import checkpointing
from audiomaepp import experiment
from audiomaepp import original_io
from audiomaepp.errors import UserError
from audiomaepp.models import layers
from audiomaepp.models import layout
from audiomaepp.models import mae
from audiomaepp.models.config import ENCODER_SIZES, ModelConfig, resolve_model_config

# How an original tensor becomes ours: 'linear' (PyTorch (out, in) -> (in, out)), 'conv'
# ((out, in, kt, kf) -> (kt, kf, in, out)), 'copy', or 'fixed' (a sin-cos table we compute).
Entry = Tuple[Tuple[str, ...], str]

FIXED_TOLERANCE = 1e-5
# Axis permutation taking an original tensor to ours (`np.argsort` of it goes back); kinds not
# listed are copied as they are.
_PERMUTATIONS = {"linear": (1, 0), "conv": (2, 3, 1, 0)}

_PLUSPLUS_LAYERS = {
    "norm1": ("norm1", "norm"), "ffn1.layer1": ("ffn1/fc1", "linear"),
    "ffn1.layer2": ("ffn1/fc2", "linear"), "norm2": ("norm2", "norm"),
    "attn.qkv_layer": ("attn/qkv", "linear"), "attn.proj_layer": ("attn/out", "linear"),
    "norm3": ("norm3", "norm"), "ffn2.linear1": ("swiglu/value", "linear"),
    "ffn2.linear2": ("swiglu/gate", "linear"), "ffn2.ln": ("swiglu/norm", "norm"),
    "ffn2.project": ("swiglu/out", "linear"),
}
_VIT_LAYERS = {
    "norm1": ("norm1", "norm"), "attn.qkv_layer": ("attn/qkv", "linear"),
    "attn.proj_layer": ("attn/out", "linear"), "norm2": ("norm2", "norm"),
    "mlp.layer1": ("mlp/fc1", "linear"), "mlp.layer2": ("mlp/fc2", "linear"),
}
_SUFFIXES = {"norm": (("weight", "scale", "copy"), ("bias", "bias", "copy")),
             "linear": (("weight", "kernel", "linear"), ("bias", "bias", "copy"))}


def _layer(names: Dict[str, Entry], key: str, path: Tuple[str, ...], kind: str) -> None:
  for suffix, leaf, how in _SUFFIXES[kind]:
    names[f"{key}.{suffix}"] = (path + (leaf,), how)


def state_dict_names(model_config: Any) -> Dict[str, Entry]:
  """Original state-dict key -> (our parameter path, conversion) for a model config.

  The fixed sin-cos tables ('fixed') have paths naming the constant: ('encoder_pos_embed',),
  ('decoder_pos_embed',). RoPE frequencies (`rope.freqs`, a non-trained parameter in the
  original too) load into `.../attn/rope_freqs`.
  """
  c = resolve_model_config(model_config)
  names: Dict[str, Entry] = {
      "cls_token": (("cls_token",), "copy"),
      "patch_embed.proj.weight": (("patch_embed", "kernel"), "conv"),
      "patch_embed.proj.bias": (("patch_embed", "bias"), "copy"),
      "encoder.pos_embed": (("encoder_pos_embed",), "fixed"),
      "decoder.mask_token": (("decoder", "mask_token"), "copy"),
      "decoder.decoder_pos_embed": (("decoder_pos_embed",), "fixed"),
  }
  _layer(names, "encoder.encoder_norm", ("encoder", "norm"), "norm")
  _layer(names, "decoder.decoder_embed", ("decoder", "embed"), "linear")
  _layer(names, "decoder.decoder_norm", ("decoder", "norm"), "norm")
  _layer(names, "decoder.decoder_pred", ("decoder", "pred"), "linear")
  stacks = (("encoder", "encoder.blocks", c.depth, c.encoder_block, c.encoder_rope),
            ("decoder", "decoder.decoder_blocks", c.decoder_depth, c.decoder_block,
             c.decoder_rope))
  for part, prefix, depth, block, rope in stacks:
    table = _PLUSPLUS_LAYERS if block == "plusplus" else _VIT_LAYERS
    for i in range(depth):
      for original, (ours, kind) in table.items():
        _layer(names, f"{prefix}.{i}.{original}", (part, f"block_{i}", *ours.split("/")), kind)
      if rope != "none":
        names[f"{prefix}.{i}.rope.freqs"] = ((part, f"block_{i}", "attn", "rope_freqs"), "copy")
  return names


def _fixed_values(c: ModelConfig) -> Dict[Tuple[str, ...], np.ndarray]:
  """The sin-cos tables behind the 'fixed' entries, shaped as the original stores them."""
  return {
      ("encoder_pos_embed",): layers.sincos_2d_table(c.width, c.grid)[None],
      ("decoder_pos_embed",): layers.sincos_1d_table(c.decoder_width, c.num_patches)[None],
  }


def _to_original_shape(shape: Tuple[int, ...], how: str) -> Tuple[int, ...]:
  permutation = _PERMUTATIONS.get(how)
  return tuple(shape) if permutation is None else tuple(shape[i] for i in np.argsort(permutation))


def _from_original(array: np.ndarray, how: str) -> np.ndarray:
  permutation = _PERMUTATIONS.get(how)
  return array if permutation is None else array.transpose(permutation)


def _to_original(array: np.ndarray, how: str) -> np.ndarray:
  permutation = _PERMUTATIONS.get(how)
  return array if permutation is None else array.transpose(np.argsort(permutation))


def _leaf(tree: Mapping[str, Any], path: Tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def state_dict_shapes(model_config: Any) -> Dict[str, Tuple[int, ...]]:
  """Original key -> tensor shape that an original checkpoint of this config holds."""
  c = resolve_model_config(model_config)
  shapes = mae.param_shapes(dataclasses.replace(c, scan_layers=False))
  fixed = _fixed_values(c)
  return {key: (fixed[path].shape if how == "fixed"
                else _to_original_shape(_leaf(shapes, path).shape, how))
          for key, (path, how) in state_dict_names(c).items()}


def to_state_dict(params: Any, model_config: Any) -> Dict[str, np.ndarray]:
  """Our params (boxed or not) -> the original state dict (NumPy float32, with the tables)."""
  c = resolve_model_config(model_config)
  params = layout.unstack_blocks(mae.unbox(params))
  fixed = _fixed_values(c)
  return {key: (np.array(fixed[path]) if how == "fixed"
                else _to_original(np.asarray(_leaf(params, path), np.float32), how))
          for key, (path, how) in state_dict_names(c).items()}


def export_state_dict(params: Any, model_config: Any) -> Dict[str, np.ndarray]:
  """`to_state_dict` for writing out (C-contiguous float32 arrays); a UserError naming every
  non-finite weight, so that no file holding NaN or inf is written."""
  state = {k: np.ascontiguousarray(v) for k, v in to_state_dict(params, model_config).items()}
  non_finite = sorted(k for k, v in state.items() if not np.isfinite(v).all())
  if non_finite:
    raise UserError(f"non-finite weights (NaN or inf) in {non_finite}; refusing to export them")
  return state


def builder(model_config: Any) -> Tuple[str, Dict[str, Any]]:
  """(arch, model_args): the original builder that makes this model and its keyword arguments,
  as the official config files' `model.arch` and `model.model_args` name them.

  A named encoder size gives `mae_plusplus_<size>` (the builder fixes the size itself), any
  other `MAE_PlusPlus` with all of its arguments. `norm_pix_loss`, a training option the
  constructor does not take, is left out. Fails for options the original does not have.
  """
  args = original_args_from_config(model_config)
  args.pop("norm_pix_loss", None)
  size_args = ("embed_dim", "depth", "num_heads")
  sizes = {v: k for k, v in ENCODER_SIZES.items()}
  size = sizes.get(tuple(args[k] for k in size_args))
  if size is None:
    return original_io.CONSTRUCTOR, args
  return f"mae_plusplus_{size}", {k: v for k, v in args.items() if k not in size_args}


# Original builder argument -> our field, from the schema's 'original' metadata.
_ARG_FIELDS = {f.metadata["original"]: f.name for f in dataclasses.fields(ModelConfig)
               if "original" in f.metadata}
# Original options this project implements only at one value: name -> required value.
_ARG_REQUIRED = {"in_chans": 1, "use_cls_token": True, "frequency_first": False,
                 "limit_swiglu_features": False, "additive_swiglu": False}
_ARG_IGNORED = ("num_params_total",)


def model_config_from_args(original_args: Union[Mapping[str, Any], str, os.PathLike]
                           ) -> ml_collections.ConfigDict:
  """The original constructor's keyword arguments (dict or JSON path) -> our `config.model`.

  An `arch` entry (an original builder name such as 'mae_plusplus_tiny', as in the official
  config files' `model.arch`) supplies the encoder size and the builder's defaults, so a config
  file's `model_args` plus its `arch` suffice.
  """
  where = "original_args"
  if isinstance(original_args, (str, os.PathLike)):
    where = os.fspath(original_args)
    try:
      with open(original_args) as f:
        original_args = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{where}: cannot read the original arguments as JSON ({e})") from None
  if not isinstance(original_args, Mapping):
    raise UserError(f"{where}: expected a JSON object of the original builder's arguments")
  args = dict(original_args)
  if "arch" in args:
    args = original_io.builder_args(args.pop("arch"), args, where)
  missing = [name for name in ("embed_dim", "depth", "num_heads") if name not in args]
  if missing:
    raise UserError(f"{where}: {missing} missing; the official configs imply them by the builder "
                    "name: add \"arch\" (the config's model.arch, e.g. \"mae_plusplus_tiny\") "
                    "or pass --original_config=FILE")
  model = experiment.model_config(size=None)
  unknown = sorted(set(args) - set(_ARG_FIELDS) - set(_ARG_REQUIRED) - set(_ARG_IGNORED)
                   - {f"{p}_{o}" for p in ("encoder", "decoder")
                      for o in ("plusplus_block", "use_swiglu_final_ffn", "use_rope")})
  if unknown:
    raise UserError(f"{where}: unknown arguments {unknown}")
  for name, required in _ARG_REQUIRED.items():
    if name in args and args[name] != required:
      raise UserError(f"{where}: {name}={args[name]!r} is not supported (only {required!r})")
  for name, field in _ARG_FIELDS.items():
    if name in args:
      value = args[name]
      model[field] = tuple(value) if isinstance(value, (list, tuple)) else value
  for part in ("encoder", "decoder"):
    plusplus = bool(args.get(f"{part}_plusplus_block", False))
    swiglu = bool(args.get(f"{part}_use_swiglu_final_ffn", False))
    if swiglu != plusplus:
      raise UserError(f"{where}: {part}_plusplus_block={plusplus} with "
                      f"{part}_use_swiglu_final_ffn={swiglu} is not supported (transformer++ "
                      "blocks here always end with SwiGLU; vanilla blocks never do)")
    model[f"{part}_block"] = "plusplus" if plusplus else "vit"
    model[f"{part}_rope"] = "sequence" if args.get(f"{part}_use_rope", False) else "none"
  sizes = {v: k for k, v in ENCODER_SIZES.items()}
  size = sizes.get((model.width, model.depth, model.num_heads))
  if size is not None:
    model.size, model.width, model.depth, model.num_heads = size, None, None, None
  try:
    resolve_model_config(model)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None
  return model


def original_args_from_config(model_config: Any) -> Dict[str, Any]:
  """Our `config.model` -> the original builder's keyword arguments (inverse of
  `model_config_from_args`). Fails for options the original does not have."""
  c = resolve_model_config(model_config)
  for name, value, allowed in (("encoder_rope", c.encoder_rope, ("none", "sequence")),
                               ("decoder_rope", c.decoder_rope, ("none", "sequence")),
                               ("swiglu_norm", c.swiglu_norm, ("shared",))):
    if value not in allowed:
      raise UserError(f"config.model.{name}={value!r} has no equivalent in the original "
                      f"(only {list(allowed)})")
  args = {name: getattr(c, field) for name, field in _ARG_FIELDS.items()}
  args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
  if not c.norm_pix_loss:
    del args["norm_pix_loss"]  # the original's MAE_PlusPlus constructor does not take it
  args.update({k: v for k, v in _ARG_REQUIRED.items()})
  for part, block, rope in (("encoder", c.encoder_block, c.encoder_rope),
                            ("decoder", c.decoder_block, c.decoder_rope)):
    args[f"{part}_plusplus_block"] = block == "plusplus"
    args[f"{part}_use_swiglu_final_ffn"] = block == "plusplus"
    args[f"{part}_use_rope"] = rope == "sequence"
  return args


def _model_config(checkpoint: original_io.OriginalCheckpoint,
                  original_args: Union[Mapping[str, Any], str, os.PathLike, None]
                  ) -> ml_collections.ConfigDict:
  """The model of `original_args`, cross-checked with the checkpoint's saved trainer args."""
  saved = checkpoint.original_args
  if original_args is None and saved is None:
    raise UserError(f"{checkpoint.source}: the checkpoint does not record its model; pass "
                    "--original_config=FILE (the run's config file) or --original_args=JSON")
  model_config = model_config_from_args(saved if original_args is None else original_args)
  if original_args is not None and saved is not None:
    given = resolve_model_config(model_config)
    recorded = resolve_model_config(model_config_from_args(saved))
    differ = [f"{f.name} {getattr(given, f.name)!r} vs {getattr(recorded, f.name)!r}"
              for f in dataclasses.fields(ModelConfig)
              if getattr(given, f.name) != getattr(recorded, f.name)]
    if differ:
      raise UserError(f"{checkpoint.source}: the model given differs from the one its saved args "
                      f"record (given vs saved): {'; '.join(differ)}")
  return model_config


def load(weights: Union[Mapping[str, Any], str, os.PathLike],
         original_args: Union[Mapping[str, Any], str, os.PathLike, None] = None
         ) -> Tuple[ml_collections.ConfigDict, Dict[str, Any]]:
  """Loads an original checkpoint.

  Args:
    weights: a mapping of arrays with the original key names, an `.npz`, a `.pth` (bare state
      dict, the original trainer's `{'model': ..., 'args': ...}` or `{'state_dict': ...}`; needs
      PyTorch) or an original run directory (its newest checkpoint). A DDP `module.` prefix is
      stripped.
    original_args: the original builder's keyword arguments (dict or JSON path, e.g.
      fixtures/*_config.json, or `original_io.read_config_file`'s result); None takes them from
      the checkpoint's saved trainer args, which are otherwise cross-checked against them.

  Returns:
    (model_config, variables): `config.model` for `build_model`, and {'params': ...} of plain
    float32 jax arrays in the config's block layout (stacked when `scan_layers`).

  Raises:
    UserError: listing every missing and unexpected key and every shape mismatch, naming a
      non-finite weight, or when a stored fixed table differs from ours by more than its stored
      dtype's rounding.
  """
  checkpoint = original_io.read_checkpoint(weights)
  model_config = _model_config(checkpoint, original_args)
  c = resolve_model_config(model_config)
  state = checkpoint.state
  names = state_dict_names(c)
  expected = state_dict_shapes(c)
  missing = sorted(set(names) - set(state))
  unexpected = sorted(set(state) - set(names))
  mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, expected {expected[k]}"
                      for k in set(names) & set(state) if tuple(state[k].shape) != expected[k])
  if missing or unexpected or mismatched:
    raise UserError(
        f"{checkpoint.source}: the checkpoint does not match the model of the original "
        f"arguments: missing keys ({len(missing)}): {missing}; unexpected keys "
        f"({len(unexpected)}): {unexpected}; shape mismatches ({len(mismatched)}): {mismatched}")
  non_finite = sorted(k for k in names if not np.isfinite(state[k]).all())
  if non_finite:
    raise UserError(f"{checkpoint.source}: non-finite weights (NaN or inf) in {non_finite}; "
                    "refusing to import them")

  fixed = _fixed_values(c)
  params: Dict[str, Any] = {}
  for key, (path, how) in names.items():
    if how == "fixed":
      # A table stored in float16/bfloat16 carries that dtype's rounding (up to half an ulp).
      tolerance = max(FIXED_TOLERANCE, checkpoint.eps[key])
      error = float(np.max(np.abs(state[key] - fixed[path])))
      if error > tolerance:
        raise UserError(f"{checkpoint.source}: {key} differs from the fixed table this model "
                        f"computes (max abs difference {error:.3g}, tolerance {tolerance:.3g})")
      continue
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(_from_original(state[key], how))
  if "plusplus" in (c.encoder_block, c.decoder_block) and c.swiglu_norm == "shared":
    logging.info("original checkpoint: norm3 of each transformer++ block is loaded but unused "
                 "(swiglu_norm='shared', as in the original)")
  return model_config, {"params": layout.to_layout(params, c.scan_layers)}


def import_to_workdir(weights: str, output_dir: str,
                      config: ml_collections.ConfigDict | None = None,
                      original_args: str | dict | None = None) -> ml_collections.ConfigDict:
  """Converts `weights` and writes config.json and a step-0 params checkpoint into `output_dir`.

  The model comes from `config.model`, from `original_args`, or (neither given) from the
  checkpoint's saved trainer args.
  """
  if config is not None and original_args is not None:
    raise ValueError("pass at most one of config or original_args")
  if os.path.exists(os.path.join(output_dir, checkpointing.CHECKPOINT_DIR)):
    raise UserError(f"{output_dir} already holds checkpoints; choose an empty directory")
  if config is None:
    config = experiment.base_config()
    config.model, variables = load(weights, original_args)
  else:
    _, variables = load(weights, original_args_from_config(config.model))
  checkpointing.save_params(output_dir, variables["params"], step=0)
  checkpointing.save_config(output_dir, config)
  return config
