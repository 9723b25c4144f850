"""Shared pieces of every experiment config: model sizes, data, optimisation, sharding.

Each file in configs/ is one experiment and returns an ``ml_collections.ConfigDict`` from
``get_config()``. Fields are documented here once.
"""
import ml_collections
from ml_collections import config_dict

# Encoder sizes (SPEC §3): width, depth, heads.
ENCODER_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "medium": (512, 12, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def model_config(size: str = "base", block: str = "plusplus") -> ml_collections.ConfigDict:
  """The model section. `block` is 'plusplus' (AudioMAE++) or 'vit' (vanilla MAE)."""
  m = ml_collections.ConfigDict()
  m.size = size  # a key of ENCODER_SIZES; width/depth/num_heads below override it when set
  m.width = config_dict.placeholder(int)
  m.depth = config_dict.placeholder(int)
  m.num_heads = config_dict.placeholder(int)
  m.decoder_width = 384
  m.decoder_depth = 4
  m.decoder_num_heads = 8
  m.mlp_ratio = 4.0
  m.input_shape = (200, 80)  # (time frames, mel bins)
  m.patch_size = (4, 16)  # (time, mel)
  m.encoder_block = block  # 'plusplus' | 'vit'
  m.decoder_block = block
  # 'shared': the original feeds the SwiGLU from the attention's LayerNorm and never uses norm3
  # (published weights depend on it); 'separate': norm3 normalises the SwiGLU input.
  m.swiglu_norm = "shared"
  # Rotary embeddings: 'none' | 'sequence' (original: index in the post-masking sequence) |
  # 'patch_2d' (true time and frequency patch positions).
  m.encoder_rope = "none"
  m.decoder_rope = "none"
  m.mask_ratio = 0.8
  m.mask_mode = "unstructured"  # 'unstructured' | 'timestep'
  m.norm_pix_loss = False
  # Per-frame features from `encode`: 'time_major' (correct) or 'original' (the original code's
  # frequency-major regrouping; needed only to reproduce published numbers).
  m.frame_layout = "time_major"
  m.dtype = "float32"  # compute dtype; parameters are always float32
  m.remat = False  # rematerialise each block in the backward pass
  m.attention_impl = config_dict.placeholder(str)  # None (auto) | 'xla' | 'cudnn'
  return m


def data_config() -> ml_collections.ConfigDict:
  """The data section: where the log-mel shards are and how clips become crops."""
  d = ml_collections.ConfigDict()
  # 'tfds': a TFDS ArrayRecord dataset built by `audiomaepp.tools.prepare_dataset`, read with
  # tfds.data_source from `data_dir`; 'synthetic': the built-in corpus, built on first use into
  # `data_dir` (or a cache directory when unset).
  d.source = "tfds"
  d.name = "audio_logmel"  # TFDS builder name
  d.data_dir = config_dict.placeholder(str)
  d.train_split = "train"
  d.eval_split = "eval"
  d.crop_frames = 200  # equals model.input_shape[0]
  d.num_workers = 0  # Grain worker processes per host (0: in the main process)
  d.prefetch_buffer_size = 2  # batches buffered per Grain worker process
  # Record reads per process: threads and records read ahead. Grain's defaults (16, 500) cost
  # more in bookkeeping than they save on local disks; raise them for network file systems.
  d.read_threads = 4
  d.read_buffer_size = 128
  d.synthetic_num_clips = 512  # size of the built-in corpus when source == 'synthetic'
  return d


def base_config(size: str = "base", block: str = "plusplus") -> ml_collections.ConfigDict:
  """A full pretraining config with the paper's optimisation (SPEC §5)."""
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
  # Per-device peak FLOP/s for the MFU estimate on devices not in metrics.PEAK_FLOPS (0: unknown).
  c.peak_flops = 0.0
  c.inject_nan_at_step = -1  # fault-injection tests: that step's batch is replaced by NaN

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
      ("kv", None),
  )
  return c
