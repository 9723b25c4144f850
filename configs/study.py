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
  m.width, m.depth, m.num_heads = 96, 2, 4
  m.decoder_width, m.decoder_depth, m.decoder_num_heads = 96, 1, 4
  m.encoder_rope = m.decoder_rope = "patch_2d"
  m.dtype = "float32"  # faster than bfloat16 on CPUs

  config.data.source = "rich"
  config.data.synthetic_num_clips = 512  # 460 train, 52 eval clips of 2-6 s

  config.batch_size = 16
  config.num_train_steps = 300  # about 10 epochs of the corpus
  config.base_lr = 1.6e-2  # x 16 / 256: peak learning rate 1e-3
  config.warmup_epochs = 1
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.eval_batches = 4
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3  # steps 100, 200, 300: the study can probe the trend
  return config
