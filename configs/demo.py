"""A small AudioMAE++ on the built-in synthetic corpus: pretrains on a 2-core CPU in minutes.

The README's main-job command: `python main.py --config=configs/demo.py --workdir=workdirs/demo`.
It writes checkpoints, metrics.jsonl, TensorBoard events, reconstruction pictures and a loss
curve to the workdir. Shrink it further with overrides, e.g.
`--config.num_train_steps=6 --config.model.depth=1` (what the tests do).

Unlike the paper's configs, the demo uses rotary embeddings over true (time, frequency) patch
positions ('patch_2d'). With only the fixed 1-D decoder table (positions t*5+f) a model this
small needs far longer than a few hundred steps to find the visible patches of the masked patch's
frequency row: in 300 steps the loss stays on the "predict the clip mean" plateau near 1.0,
while with 2-D rotary positions it falls to about 0.45.
"""
from audiomaepp import experiment


def get_config():
  config = experiment.base_config(size=None)  # no named size: width/depth/heads below
  m = config.model
  m.width, m.depth, m.num_heads = 128, 2, 4
  m.decoder_width, m.decoder_depth, m.decoder_num_heads = 128, 1, 4
  m.encoder_rope = m.decoder_rope = "patch_2d"
  m.dtype = "float32"  # faster than bfloat16 on CPUs

  config.data.source = "synthetic"
  config.data.synthetic_num_clips = 512  # 460 train, 52 eval clips

  config.batch_size = 16
  config.num_train_steps = 400  # about 14 epochs of the corpus
  config.base_lr = 1.6e-2  # x 16 / 256: peak learning rate 1e-3
  config.warmup_epochs = 1
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.eval_batches = 3
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  return config
