"""Fine-tunes on a small labelled HEAR task (hundreds to a few thousand clips: ESC-50, Speech
Commands subsets, the evaluation suite's tasks): the small-task recipe.

    python main.py --config=configs/finetune_small.py:study --workdir=runs/ft_kws \
        --config.init_from=runs/study --config.data.task_dir=TASKS/kws-v1

The argument picks the model, whose fields must equal the pretrained workdir's: a named size
('tiny', 'base' (the default), 'large'), 'demo' (configs/demo.py's model) or 'study' /
'study_vit' (configs/study.py's AudioMAE++ / MAE). Override what the pretraining run changed,
e.g. `--config.model.encoder_rope=patch_2d --config.model.decoder_rope=patch_2d` for the study's
rotary variant (`configs/study.py:plusplus,patch_2d`).

The recipe is AudioMAE's ESC-50 fine-tuning (`main_finetune_esc.py` defaults in
facebookresearch/AudioMAE), not its AudioSet-20K one (configs/finetune_base.py), whose mixup,
4 warm-up epochs of 60 and 5e-4 weight decay are sized for 20,000 clips. Field by field:
  num_epochs 40: changed from AudioMAE ESC's `--epochs 50` for a 2-core CPU: 40 epochs of 180 kws
    clips (440 steps of 16) take the study encoder about 13 minutes there, 50 would pass 15.
  warmup_epochs 5: AudioMAE ESC `--warmup_epochs 5`, in epochs of the small task (55 steps).
  base_lr 1.6e-2 (peak 1e-3 at batch 16): AudioMAE ESC `--blr 1e-3`, whose peak is
    blr x batch / 256, 1e-3 at 256 clips a batch; that peak is kept at batch 16 (linear scaling
    would give 6e-5, under which a few hundred steps barely move the head from its N(0, 2e-5)
    start). min_lr 1e-6: AudioMAE ESC.
  batch_size 16: changed from AudioMAE's 64 per GPU, for a 2-core CPU.
  weight_decay 0.05: AudioMAE ESC `--weight_decay 0.05` (MAE's; the AS-20K script has 5e-4).
  layer_decay 0.65: MAE's ViT-B recipe (facebookresearch/mae FINETUNE.md: 0.65 for ViT-B, 0.75
    for ViT-L/H; AudioMAE ESC 0.75). Lower decay keeps the lower blocks nearer the pretrained
    encoder while the head learns at the full rate.
  drop_path 0.1 for the named sizes (AudioMAE ESC `--drop_path 0.1`); 0 for the demo and study
    encoders of 2 and 4 blocks: MAE's drop path falls with size (ViT-H 0.3, L 0.2, B 0.1).
  mixup 0: AudioMAE ESC `--mixup 0` and AST's ESC-50 script (YuanGongND/ast egs/esc50/run_esc.sh
    `mixup=0`). label_smoothing 0.1: AudioMAE ESC `--smoothing 0.1`.
  timem 37, freqm 15: AST's ESC-50 SpecAugment (`timem=96 freqm=24` of 512 frames x 128 bins)
    scaled to 200 x 80. AudioMAE's `main_finetune_esc.py` defaults swap the two (`--freqm 96
    --timem 24`); AST's reading masks at most 30 % of the bins, not 75 %.
  weighted_sampling False: AudioMAE's ESC script has no weighted sampler.
"""
import os

from audiomaepp import experiment

SIZES = ("tiny", "base", "large")
_CONFIGS = os.path.dirname(__file__)


def get_config(model: str = "base"):
  """The small-task recipe with the model named by `model` (see the module docstring)."""
  if model in SIZES:
    config = experiment.finetune_config(size=model)
  elif model == "demo":
    config = experiment.finetune_config(size=None)
    config.model = experiment.load_config(os.path.join(_CONFIGS, "demo.py")).model
  elif model in ("study", "study_vit"):
    config = experiment.finetune_config(size=None)
    block = "vit" if model == "study_vit" else "plusplus"
    config.model = experiment.load_config(os.path.join(_CONFIGS, "study.py"), block).model
  else:
    raise ValueError(f"configs/finetune_small.py:{model}: expected one of "
                     f"{', '.join(SIZES)}, demo, study, study_vit")
  ft = config.finetune
  ft.mixup = 0.0
  ft.label_smoothing = 0.1
  ft.layer_decay = 0.65
  ft.drop_path = 0.1 if model in SIZES else 0.0
  ft.timem, ft.freqm = 37, 15
  ft.weighted_sampling = False

  config.batch_size = 16
  config.num_epochs = 40
  config.num_train_steps = -1
  config.warmup_epochs = 5
  config.base_lr = 1.6e-2  # x 16 / 256: peak learning rate 1e-3
  config.min_lr = 1e-6
  config.weight_decay = 0.05
  config.log_every_steps = 25
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 100
  return config
