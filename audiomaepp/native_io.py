"""The native model folder: one model's parameters under this project's own names, for any model
it builds (rotary 2-D positions included), in the layout model hubs use:

    DIR/config.json        the resolved model section (`models.ModelConfig`'s fields): enough to
                           rebuild the model exactly
    DIR/model.safetensors  the parameters (float32), named by their Flax paths joined with '/'
                           (`encoder/blocks/attn/qkv/kernel`, `cls_token`, ...)
    DIR/README.md          a model card written from the run (`model_card`)

`tools.export --format=native` writes it from a workdir (`export`); `hear_api.load_model`,
`tools.embed` and fine-tuning's `config.init_from` read it (`is_folder`, `read`) wherever they
take a workdir.
"""
import json
import os
import shutil
from typing import Any, Mapping, Optional

from etils import epath
from flax import traverse_util
import jax
import numpy as np
import safetensors.numpy

from audiomaepp import checkpointing
from audiomaepp import metrics
from audiomaepp import models
from audiomaepp.errors import UserError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CARD_FILE = "README.md"
_SEPARATOR = "/"
_BLOCKS = {"plusplus": "transformer++ (SwiGLU)", "vit": "ViT (vanilla MAE)"}
_ROPES = {"none": "", "sequence": " + RoPE over the index in the visible sequence (sequence)",
          "patch_2d": " + RoPE over the (time, frequency) patch position (patch_2d)"}


def is_folder(path: Any) -> bool:
  """Whether `path` is a native model folder rather than a workdir: a directory without
  checkpoints/ that holds model.safetensors or the model card (so that a folder missing one of
  its files is read, and named, as a model folder)."""
  folder = epath.Path(path)
  return (folder.is_dir() and not (folder / checkpointing.CHECKPOINT_DIR).exists()
          and any((folder / name).exists() for name in (MODEL_FILE, CARD_FILE)))


def export(workdir: str, output: str, step: Optional[int] = None) -> None:
  """Writes the model folder `output` from checkpoint `step` of a pretraining workdir or an
  imported original, with a model card from its config.json and metrics.jsonl.

  `step` None exports the newest complete step; a damaged one is refused (UserError naming it)
  rather than replaced by an older one, so the card's step is the one exported.
  """
  if os.path.exists(output):
    raise UserError(f"{output} already exists; choose another folder or remove it")
  if is_folder(workdir):
    raise UserError(f"{workdir} is an exported model folder already; copy it")
  run_config = checkpointing.load_config(workdir)
  if run_config.get("task") == "finetune":
    raise UserError(f"{workdir} is a fine-tuning workdir (a classifier); export the pretraining "
                    "workdir it started from (its config.init_from)")
  model_config = models.resolve_model_config(run_config.model)
  if step is None:
    step = checkpointing.latest_complete_step(workdir)
  params = checkpointing.restore_params(workdir, models.abstract_params(model_config), step=step)
  card = model_card(model_config, run_config, step, _train_loss(workdir, step), workdir, output)
  write(output, model_config, params, card)


def _train_loss(workdir: str, step: int) -> Optional[float]:
  """The last train loss metrics.jsonl records at or before `step` (NaN where it was not finite;
  None: none recorded)."""
  records = [r for r in metrics.read_jsonl(checkpointing.workdir_path(workdir) /
                                           metrics.METRICS_FILE)
             if r.get("split") == "train" and r.get("step", 0) <= step and "loss" in r]
  if not records:
    return None
  loss = records[-1]["loss"]
  return float("nan") if loss is None else float(loss)


def write(output: str, model_config: Any, params: Any, card: str) -> None:
  """Writes the folder `output`, which must not exist; it appears complete or not at all.

  Raises:
    UserError: `output` exists, or some weights are NaN or inf (every one named).
  """
  if os.path.exists(output):
    raise UserError(f"{output} already exists; choose another folder or remove it")
  tensors = {name: np.ascontiguousarray(leaf, np.float32) for name, leaf in
             traverse_util.flatten_dict(models.unbox(params), sep=_SEPARATOR).items()}
  non_finite = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
  if non_finite:
    raise UserError(f"non-finite weights (NaN or inf) in {non_finite}; refusing to export them")
  files = {CONFIG_FILE: json.dumps(models.resolve_model_config(model_config).to_dict(),
                                   indent=2, sort_keys=True).encode(),
           # Serialised here rather than by save_file, which makes its files private (0600).
           MODEL_FILE: safetensors.numpy.save(tensors, metadata={"format": "flax"}),
           CARD_FILE: card.encode()}
  partial = f"{output}.partial"
  if os.path.exists(partial):  # left by an export that was killed
    shutil.rmtree(partial)
  os.makedirs(partial)
  try:
    for name, content in files.items():
      with open(os.path.join(partial, name), "wb") as f:
        f.write(content)
    os.rename(partial, output)
  finally:
    if os.path.exists(partial):
      shutil.rmtree(partial)


def read(path: Any) -> tuple[models.ModelConfig, dict[str, Any]]:
  """(model config, parameters on this process's first device) of a native model folder.

  Raises:
    UserError: one line naming a missing file, a config.json that does not parse or resolve,
      or the first tensor (by name) that is missing, not asked for, or of another shape or type.
  """
  folder = epath.Path(path)
  for name in (CONFIG_FILE, MODEL_FILE):
    if not (folder / name).exists():
      raise UserError(f"{path}: no {name}; expected a model folder written by "
                      f"audiomaepp.tools.export --format=native ({CONFIG_FILE}, {MODEL_FILE}) "
                      f"or a workdir with {checkpointing.CHECKPOINT_DIR}/")
  config_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
  record = checkpointing.read_json_object(config_path, "the model section")
  try:
    model_config = models.resolve_model_config(record)
  except UserError as e:
    raise UserError(f"{config_path}: {e}") from None
  try:
    tensors = safetensors.numpy.load(model_path.read_bytes())
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{model_path}: not a safetensors file ({type(e).__name__}: {e})") from None
  expected = traverse_util.flatten_dict(models.param_shapes(model_config), sep=_SEPARATOR)
  for name in sorted(set(expected) | set(tensors)):
    problem = None
    if name not in tensors:
      problem = f"has no tensor {name}"
    elif name not in expected:
      problem = f"has tensor {name}, which is no parameter of that model"
    elif tensors[name].shape != tuple(expected[name].shape):
      problem = f"has {name} of shape {tensors[name].shape}, the model's is {expected[name].shape}"
    elif tensors[name].dtype.kind != "f":
      problem = f"has {name} of type {tensors[name].dtype}, expected floating point"
    if problem:
      raise UserError(f"{model_path} does not match the model of {config_path}: it {problem}")
  params = {name: np.asarray(tensors[name], np.float32) for name in expected}
  return model_config, jax.device_put(traverse_util.unflatten_dict(params, sep=_SEPARATOR),
                                      jax.local_devices()[0])


def _table(rows: list[tuple[str, Any]]) -> str:
  """A two-column Markdown table without a header row."""
  return "| | |\n|---|---|\n" + "".join(f"| {label} | {value} |\n" for label, value in rows)


def model_card(model_config: Any, run_config: Mapping[str, Any], step: int,
               train_loss: Optional[float], source: str, output: str) -> str:
  """README.md of a model folder: the model, its data (as `run_config` records it), the
  exported `step`, the last train loss at or before it (None: not recorded), how to load it."""
  c = models.resolve_model_config(model_config)
  counts = models.parameter_counts(c)
  data = run_config.get("data") or {}
  model = _table([
      ("size", c.size or "custom"),
      ("encoder", f"{_BLOCKS[c.encoder_block]}: width {c.width}, depth {c.depth}, "
                  f"{c.num_heads} heads, MLP ratio {c.mlp_ratio:g}"),
      ("decoder", f"{_BLOCKS[c.decoder_block]}: width {c.decoder_width}, depth "
                  f"{c.decoder_depth}, {c.decoder_num_heads} heads"),
      ("input", f"{c.input_shape[0]} log-mel frames x {c.input_shape[1]} mel bins (16 kHz "
                "audio, 10 ms hop)"),
      ("patch size", f"{c.patch_size[0]} frames x {c.patch_size[1]} mel bins: a {c.grid[0]} x "
                     f"{c.grid[1]} grid"),
      ("encoder positions", f"fixed 2-D sin-cos table{_ROPES[c.encoder_rope]}"),
      ("decoder positions", f"fixed 1-D sin-cos table{_ROPES[c.decoder_rope]}"),
      ("parameters", f"{counts['trainable']:,} trainable: encoder {counts['encoder']:,}, "
                     f"decoder {counts['decoder']:,}"),
      ("masking", f"{c.mask_ratio:.0%} of the patches, {c.mask_mode}"),
      ("embedding size", f"{c.grid[1] * c.width} per frame and per scene"),
  ])
  training = _table([
      ("data", ", ".join(f"{k} `{data[k]}`" if data.get(k) is not None else f"{k} not set"
                         for k in ("source", "name", "data_dir"))),
      ("steps", step),
      ("final loss", "not recorded" if train_loss is None else f"{train_loss:.4g} (train)"),
  ])
  name = os.path.basename(os.path.normpath(output))
  return f"""# {name}: an AudioMAE++ masked autoencoder

Exported from `{source}` at step {step} by `python -m audiomaepp.tools.export --format=native`.
Encoder and decoder, as pretrained; scene and frame embeddings come from the encoder.

## Model

{model}
## Training

{training}
## Use

```python
from audiomaepp import hear_api
model = hear_api.load_model("{output}")
scene = hear_api.get_scene_embeddings(audio, model)  # audio: (n_sounds, samples) at 16 kHz
```

```bash
python -m audiomaepp.tools.embed --checkpoint={output} --audio=a.wav --output_dir=emb
python main.py --config=configs/finetune_demo.py --workdir=runs/ft \\
    --config.init_from={output} --config.data.task_dir=TASK
```

Fine-tuning needs a config whose model fields are those of `{CONFIG_FILE}`, the model section
(`audiomaepp.models.ModelConfig`); `{MODEL_FILE}` holds the float32 parameters named by their
Flax paths (`safetensors.numpy.load_file` reads them).
"""
