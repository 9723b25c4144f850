"""The micro models of the pretraining study (`benchmarks/study.py`) on the rich built-in corpus.

`configs/study.py` (or `configs/study.py:plusplus`) is a micro AudioMAE++; `configs/study.py:vit`
the vanilla MAE with the same widths, depths, heads, positions, data, steps and batch: only the
blocks differ. Rotary 2-D patch positions as in configs/demo.py (a model this small does not
learn the fixed 1-D decoder table in a few hundred steps).
"""
from audiomaepp import experiment


def get_config(block: str = "plusplus"):
  config = experiment.base_config(size=None, block=block)
  m = config.model
  m.width, m.depth, m.num_heads = 128, 2, 4
  m.decoder_width, m.decoder_depth, m.decoder_num_heads = 128, 1, 4
  m.encoder_rope = m.decoder_rope = "patch_2d"
  m.dtype = "float32"  # faster than bfloat16 on CPUs

  config.data.source = "rich"
  config.data.synthetic_num_clips = 2048

  config.batch_size = 32
  config.num_train_steps = 600
  config.base_lr = 8e-3  # x 32 / 256: peak learning rate 1e-3
  config.warmup_epochs = 1
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.eval_batches = 4
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  return config
