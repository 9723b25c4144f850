"""The model section of a config, validated and resolved to plain numbers.

`ModelConfig` is the single schema of the model section (fields, defaults, meanings, original
argument names); `resolve_model_config` turns `config.model` (fields left out take the schema's
defaults) into a frozen, fully resolved `ModelConfig`, so that a bad config fails with one clear
line before anything is traced or compiled.
"""
import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp

from audiomaepp.errors import UserError


BLOCKS = ("plusplus", "vit")
ROPE_MODES = ("none", "sequence", "patch_2d")
MASK_MODES = ("unstructured", "timestep")
FRAME_LAYOUTS = ("time_major", "original")
SWIGLU_NORMS = ("shared", "separate")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = (None, "xla", "cudnn")
# The fields that take one of a few values (ropes are checked with the widths).
_CHOICES = {"encoder_block": BLOCKS, "decoder_block": BLOCKS, "swiglu_norm": SWIGLU_NORMS,
            "mask_mode": MASK_MODES, "frame_layout": FRAME_LAYOUTS, "dtype": tuple(DTYPES),
            "attention_impl": ATTENTION_IMPLS}
# Rematerialisation of each block in the backward pass: 'none', 'full' (keep only the block's
# input), 'dots' (keep the outputs of matmuls without batch dimensions, recompute the rest).
REMAT_POLICIES = ("none", "full", "dots")


# Encoder sizes (docs/reference.md#sizes-and-parameter-counts): width, depth, heads.
ENCODER_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def _field(default: Any, doc: str, original: Optional[str] = None) -> Any:
  """A schema field: its default, what it means, and the original builder's argument name."""
  metadata = {"doc": doc}
  if original:
    metadata["original"] = original
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The one schema of the model section: every field, its default and meaning.

  `config.model` (a ConfigDict, see `audiomaepp.experiment.model_config`) is derived from these
  fields; `resolve_model_config` validates it and fills in the size, giving a frozen, hashable
  instance (a linen attribute). Field metadata 'original' names the original PyTorch builder's
  keyword argument (`audiomaepp.original`).
  """
  size: Optional[str] = _field(
      "base", "a key of ENCODER_SIZES; width/depth/num_heads override it when set")
  width: Optional[int] = _field(None, "encoder width (None: from size)", "embed_dim")
  depth: Optional[int] = _field(None, "encoder blocks (None: from size)", "depth")
  num_heads: Optional[int] = _field(None, "encoder heads (None: from size)", "num_heads")
  decoder_width: int = _field(384, "decoder width", "decoder_embed_dim")
  decoder_depth: int = _field(4, "decoder blocks", "decoder_depth")
  decoder_num_heads: int = _field(8, "decoder heads", "decoder_num_heads")
  mlp_ratio: float = _field(4.0, "MLP hidden width / width", "mlp_ratio")
  input_shape: Tuple[int, int] = _field((200, 80), "(time frames, mel bins)", "img_size")
  patch_size: Tuple[int, int] = _field((4, 16), "(time, mel)", "patch_size")
  encoder_block: str = _field("plusplus", "'plusplus' (AudioMAE++) | 'vit' (vanilla MAE)")
  decoder_block: str = _field("plusplus", "'plusplus' | 'vit'")
  swiglu_norm: str = _field(
      "shared", "'shared': the original feeds the SwiGLU from the attention's LayerNorm and never "
      "uses norm3 (published weights depend on it); 'separate': norm3 normalises the SwiGLU input")
  encoder_rope: str = _field(
      "none", "rotary embeddings: 'none' | 'sequence' (original: index in the post-masking "
      "sequence) | 'patch_2d' (true time and frequency patch positions)")
  decoder_rope: str = _field("none", "as encoder_rope, for the decoder")
  mask_ratio: float = _field(0.8, "fraction of patches removed in training", "mask_ratio")
  mask_mode: str = _field("unstructured", "'unstructured' | 'timestep'", "masking_mode")
  norm_pix_loss: bool = _field(False, "standardise each target patch", "norm_pix_loss")
  frame_layout: str = _field(
      "time_major", "per-frame features from `encode`: 'time_major' (correct) or 'original' (the "
      "original code's frequency-major regrouping; only to reproduce published numbers)")
  dtype: str = _field("float32", "compute dtype; parameters are always float32")
  scan_layers: bool = _field(
      True, "encoder and decoder blocks under nn.scan: parameters stacked along a leading "
      "'layers' axis (encoder/blocks, decoder/blocks), compile time independent of depth; "
      "False: unrolled blocks encoder/block_0.. (the layout before scanning)")
  remat: str = _field("none", "rematerialise each block in the backward pass: "
                      "'none' | 'full' | 'dots' (save matmul outputs); True/False read as "
                      "'full'/'none'")
  attention_impl: Optional[str] = _field(None, "None (auto) | 'xla' | 'cudnn'")

  @property
  def grid(self) -> Tuple[int, int]:
    """Patch grid (time patches, frequency patches), e.g. (50, 5)."""
    return (self.input_shape[0] // self.patch_size[0], self.input_shape[1] // self.patch_size[1])

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    """Values per patch vector (time x mel inside a patch), e.g. 64."""
    return self.patch_size[0] * self.patch_size[1]

  @property
  def num_keep(self) -> int:
    """Patches the encoder sees in training; the original's int(L * (100 - 100 r) / 100)."""
    return int(self.num_patches * (100 - self.mask_ratio * 100) / 100)

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  def to_dict(self) -> dict:
    """The fields as a plain dict (the form of `config.model`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _choice(fields: Mapping[str, Any], name: str, allowed) -> Any:
  value = fields[name]
  if value not in allowed:
    raise UserError(f"config.model.{name}={value!r}: expected one of {list(allowed)}")
  return value


def _pair(fields: Mapping[str, Any], name: str) -> Tuple[int, int]:
  value = fields[name]
  try:
    pair = tuple(int(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) <= 0:
    raise UserError(f"config.model.{name}={value!r}: expected two positive integers")
  return pair


def _check_heads(width: int, heads: int, width_name: str, heads_name: str) -> None:
  if width <= 0 or heads <= 0 or width % heads:
    raise UserError(f"config.model.{heads_name}={heads} must be positive and divide "
                     f"config.model.{width_name}={width}")


def _check_rope(mode: str, width: int, heads: int, name: str) -> None:
  # RoPE rotates channel pairs; 'patch_2d' gives half of the head dims to each grid axis.
  multiple = {"none": 1, "sequence": 2, "patch_2d": 4}[mode]
  if (width // heads) % multiple:
    raise UserError(f"config.model.{name}={mode!r} needs a head dim divisible by {multiple}, "
                     f"got {width // heads}")


def _remat(value: Any) -> str:
  if isinstance(value, bool):
    return "full" if value else "none"
  if value not in REMAT_POLICIES:
    raise UserError(f"config.model.remat={value!r}: expected one of {list(REMAT_POLICIES)}")
  return value


def resolve_model_config(model_config: Any) -> ModelConfig:
  """Validates `config.model` (ConfigDict, mapping or ModelConfig) and fills in every number.

  Raises:
    ValueError: one line naming the offending field (unknown field or size, patch not dividing
      the input, mask ratio outside (0, 1), heads not dividing the width, unknown mode names).
  """
  if isinstance(model_config, ModelConfig):
    return model_config
  given = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise UserError(f"config.model has unknown fields {unknown}; known: {sorted(fields)}")
  fields.update(given)
  if "scan_layers" not in given and isinstance(given.get("remat"), bool):
    # A config written before scanning existed (its `remat` was a bool): its checkpoints hold
    # unrolled blocks, so it keeps that layout.
    fields["scan_layers"] = False

  size = fields["size"]
  explicit = [fields[k] for k in ("width", "depth", "num_heads")]
  if size is None and None in explicit:
    raise UserError("config.model.size is None: set width, depth and num_heads instead")
  if size is not None and size not in ENCODER_SIZES:
    raise UserError(f"config.model.size={size!r}: expected one of {list(ENCODER_SIZES)}")
  defaults = ENCODER_SIZES[size] if size is not None else explicit
  width, depth, num_heads = (int(d if e is None else e) for e, d in zip(explicit, defaults))

  input_shape = _pair(fields, "input_shape")
  patch_size = _pair(fields, "patch_size")
  for axis, (n, p) in enumerate(zip(input_shape, patch_size)):
    if n % p:
      raise UserError(f"config.model.patch_size={patch_size} does not divide "
                       f"config.model.input_shape={input_shape} along axis {axis}")
  mask_ratio = float(fields["mask_ratio"])
  if not 0.0 < mask_ratio < 1.0:
    raise UserError(f"config.model.mask_ratio={mask_ratio}: expected a value in (0, 1)")
  mlp_ratio = float(fields["mlp_ratio"])
  if mlp_ratio <= 0:
    raise UserError(f"config.model.mlp_ratio={mlp_ratio}: expected a positive number")
  if depth <= 0 or int(fields["decoder_depth"]) <= 0:
    raise UserError(f"config.model.depth={depth} and decoder_depth={fields['decoder_depth']} "
                     "must be positive")
  decoder_width = int(fields["decoder_width"])
  decoder_num_heads = int(fields["decoder_num_heads"])
  _check_heads(width, num_heads, "width", "num_heads")
  _check_heads(decoder_width, decoder_num_heads, "decoder_width", "decoder_num_heads")
  encoder_rope = _choice(fields, "encoder_rope", ROPE_MODES)
  decoder_rope = _choice(fields, "decoder_rope", ROPE_MODES)
  _check_rope(encoder_rope, width, num_heads, "encoder_rope")
  _check_rope(decoder_rope, decoder_width, decoder_num_heads, "decoder_rope")

  # Every field not converted here passes through as given (or as the schema's default).
  fields.update(
      size=size, width=width, depth=depth, num_heads=num_heads, decoder_width=decoder_width,
      decoder_depth=int(fields["decoder_depth"]), decoder_num_heads=decoder_num_heads,
      mlp_ratio=mlp_ratio, input_shape=input_shape, patch_size=patch_size,
      encoder_rope=encoder_rope, decoder_rope=decoder_rope, mask_ratio=mask_ratio,
      norm_pix_loss=bool(fields["norm_pix_loss"]), scan_layers=bool(fields["scan_layers"]),
      remat=_remat(fields["remat"]))
  for name, choices in _CHOICES.items():
    fields[name] = _choice(fields, name, choices)
  config = ModelConfig(**fields)
  if config.attention_impl == "cudnn" and config.dtype == "float32":
    raise UserError("config.model.attention_impl='cudnn' needs config.model.dtype 'bfloat16' "
                     "or 'float16'")
  if config.num_keep < 1:
    raise UserError(f"config.model.mask_ratio={mask_ratio} keeps no patch of "
                     f"{config.num_patches}")
  return config
