"""Experiment configs: the sections every config file shares, and loading a file by path.

Each file in the repository's `configs/` is one experiment whose `get_config()` returns an
`ml_collections.ConfigDict` built from `base_config`. Model fields come from the one schema,
`audiomaepp.models.config.ModelConfig`; data, optimisation and sharding fields are documented
here once. Config files are loaded by path (`load_config`, or `config_flags` on the command line),
never imported as a package.
"""
import dataclasses
import importlib.util
import os
import typing
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from audiomaepp.models.config import ModelConfig


def _placeholder_type(annotation: Any) -> type:
  """int for Optional[int], str for Optional[str]: the type a None default is overridable as."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if args else annotation


def model_config(size: Optional[str] = "base", block: str = "plusplus"
                 ) -> ml_collections.ConfigDict:
  """The model section, from `ModelConfig`'s fields and defaults. `block`: 'plusplus' | 'vit'."""
  m = ml_collections.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    if field.default is None:
      m[field.name] = config_dict.placeholder(_placeholder_type(field.type))
    else:
      m[field.name] = field.default
  m.size = size if size is not None else config_dict.placeholder(str)
  m.encoder_block = m.decoder_block = block
  return m


def data_config() -> ml_collections.ConfigDict:
  """The data section: where the log-mel shards are and how clips become crops."""
  d = ml_collections.ConfigDict()
  # 'tfds': a TFDS ArrayRecord dataset built by `audiomaepp.tools.prepare_dataset`, read with
  # tfds.data_source from `data_dir`; 'synthetic': the built-in corpus of tones, chirps and noise,
  # 'rich': speech, music, those sounds and mixtures (`audiomaepp.data.rich`; needs espeak-ng and
  # FluidSynth); 'real': real recordings of speech, music and sound effects from Debian packages
  # (`audiomaepp.data.real`); each built on first use into `data_dir` (or a cache directory).
  d.source = "tfds"
  d.name = "audio_logmel"  # TFDS builder name
  d.data_dir = config_dict.placeholder(str)
  d.train_split = "train"
  d.eval_split = "eval"
  d.crop_frames = 200  # equals model.input_shape[0]
  # Grain worker processes per host: 0 reads in the main process; -1 (auto) is all but two of
  # this process's share of the cores where JAX runs on an accelerator (8 processes on a node of
  # 96 cores: 10 each), 0 on CPU (pipeline.num_workers resolves it).
  d.num_workers = -1
  d.prefetch_buffer_size = 2  # batches buffered per Grain worker process
  # Per process (the trainer, or each worker): threads that read and crop a host batch each, and
  # host batches made ahead. Raise them for network file systems.
  d.read_threads = 4
  d.read_buffer_size = 4
  # Size of the built-in corpus ('synthetic', 'rich'); for 'real', the most clips kept.
  d.synthetic_num_clips = 512
  return d


def base_config(size: Optional[str] = "base", block: str = "plusplus"
                ) -> ml_collections.ConfigDict:
  """A full pretraining config with the paper's optimisation (docs/reference.md#optimisation)."""
  c = ml_collections.ConfigDict()
  c.model = model_config(size, block)
  c.data = data_config()

  c.seed = 0
  c.batch_size = 1024  # global, across all hosts and devices
  c.num_epochs = 100
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.grad_accum_steps = 1

  c.base_lr = 1.5e-4  # lr = base_lr * batch_size * grad_accum_steps / 256
  c.min_lr = 0.0
  c.warmup_epochs = 10
  c.b1 = 0.9
  c.b2 = 0.95
  c.weight_decay = 0.05
  c.grad_clip_norm = 0.0  # 0: no clipping

  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_batches = 8
  c.checkpoint_every_steps = 4000
  c.keep_checkpoints = 5
  # Linear probes of the encoder while it trains (`audiomaepp.train.probes`): HEAR task folders,
  # comma-separated ('': none), scored every `every_steps` steps (`doubling`: at every_steps x
  # 1, 2, 4, ...) and at the last step, on a class-balanced subset of `max_clips` clips of each
  # task (0: every clip), each cut to its first `chunks_per_clip` encoder inputs (0: the whole
  # clip, as the HEAR API embeds it).
  c.probe = ml_collections.ConfigDict()
  c.probe.tasks = ""
  c.probe.every_steps = 1000
  c.probe.doubling = False
  c.probe.max_clips = 0
  c.probe.chunks_per_clip = 1
  # Per-device peak FLOP/s for the MFU estimate on devices not in metrics.PEAK_FLOPS (0: unknown).
  c.peak_flops = 0.0
  # 'a,b': a jax.profiler trace of steps a to b in the workdir for TensorBoard ('': none);
  # `audiomaepp.profiling`.
  c.profile_steps = ""

  # Mesh: `data` x `fsdp` devices (-1: all remaining). Parameters are replicated unless
  # `shard_params` is set, in which case the logical rules below shard them over `fsdp`.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.shard_params = False
  c.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", None),
      ("heads", None),
      ("layers", None),  # the stacked-blocks axis of scanned layers
  )
  return c


def load_config(path: str | os.PathLike, arg: Optional[str] = None
                ) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`) of the config file at `path`, loaded by path.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  name = "audiomaepp_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def finetune_config(size: Optional[str] = "base", block: str = "plusplus"
                    ) -> ml_collections.ConfigDict:
  """A fine-tuning config (`main.py` runs it when `task` is 'finetune'): the encoder of a
  pretrained workdir and a linear head trained on a labelled HEAR task folder, with the
  recipe of AudioMAE's `main_finetune_as.py` (defaults cited field by field)."""
  c = base_config(size, block)
  del c.probe  # pretraining only
  c.task = "finetune"
  # A pretraining workdir (or one written by tools.import_original, or a model folder from
  # tools.export --format=native) whose encoder initialises the classifier (its decoder is
  # dropped); None trains the same classifier from random init.
  c.init_from = config_dict.placeholder(str)
  c.init_step = config_dict.placeholder(int)  # its checkpoint step (None: the newest)
  # Labelled clips (`data/labelled.py`): 'hear', a HEAR task folder (`evaluation/tasks.py`),
  # whose vocabulary sets the classes and prediction_type multi-label (sigmoid BCE, mAP) or
  # single-label (softmax, top-1); or 'tfds', the labelled shards in data_dir that
  # `tools.prepare_dataset --labels_csv` builds from AudioSet's CSVs (multi-label).
  c.data.source = "hear"
  c.data.task_dir = config_dict.placeholder(str)
  c.data.train_split = "train"
  c.data.eval_split = "valid"  # evaluated every eval_every_steps; picks the best checkpoint
  c.data.test_split = "test"  # evaluated once at the end with the best checkpoint ('' : none)
  # Crops of crop_frames scored per clip in validation and test, evenly spaced from the clip's
  # start to its end, their logits averaged (`pipeline.eval_crops`); 1: the centre crop. A clip
  # of n crop lengths is covered by n crops (10-s AudioSet clips, 2-s crops: 5, which leave
  # out one of their 1,001 frames).
  c.data.eval_crops = 1
  # Each split may join several ('fold00,fold01'). A task of folds (ESC-50 style): fold i >= 0
  # replaces the three with hear-eval-kit's run i (test fold i, validate on fold i+1, train on
  # the rest); -1 uses the fields above.
  c.data.fold = -1
  c.num_classes = -1  # -1: from the task's vocabulary; otherwise it must equal its size

  f = c.finetune = ml_collections.ConfigDict()
  f.pool = "mean"  # 'mean' of the patch tokens (AudioMAE's global_pool default) or 'cls'
  f.drop_path = 0.1  # AudioMAE --drop_path 0.1 (linear over depth, as timm)
  f.layer_decay = 0.75  # AudioMAE --layer_decay 0.75 (BEiT's layer-wise lr decay)
  # SpecAugment widths in frames / mel bins. AudioMAE masks up to 192 of 1024 frames and 48 of
  # 128 bins (`audio_conf_train` freqm/timem); scaled to the 200 x 80 input: 37 and 30.
  f.timem = 37
  f.freqm = 30
  f.mixup = 0.5  # AudioMAE --mixup 0.5 (timm Mixup alpha, 'batch' mode)
  # AudioMAE --smoothing 0.1; applied to single-label tasks only (multi-label BCE: none).
  f.label_smoothing = 0.1
  # AS-2M: AudioMAE --weight_sampler with AST's weights (sum of 1000 / (label count + 0.01)).
  f.weighted_sampling = False
  f.ema_decay = 0.0  # > 0 keeps an EMA of the weights, evaluated instead (DeiT's model_ema)
  f.freeze_encoder = False  # True: train only the head (a linear probe with the same recipe)

  # AudioMAE's fine-tuning optimiser: AdamW, lr = blr * batch / 256 with blr 1e-3 (its AS-20K
  # script), min_lr 1e-6, 4 warm-up epochs of 60, weight decay 5e-4, betas (0.9, 0.999).
  c.base_lr = 1e-3
  c.min_lr = 1e-6
  c.warmup_epochs = 4
  c.num_epochs = 60
  c.weight_decay = 5e-4
  c.b2 = 0.999
  c.batch_size = 64
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  return c
