"""AudioMAE++ and MAE models (Flax linen): `build_model(config.model)` and helpers."""
from audiomaepp.models.config import ModelConfig, resolve_model_config
from audiomaepp.models.flops import (encode_flops_per_sample, forward_flops_per_sample,
                                     train_flops_per_sample)
from audiomaepp.models.mae import (MaskedAutoencoder, abstract_params, build_model,
                                   mask_from_ids, masked_mse, masking_ids_from_noise,
                                   masking_noise, param_shapes, parameter_counts,
                                   patch_statistics, patch_targets, patchify,
                                   positional_table_size, random_masking_ids,
                                   restore_ids_from_keep, unbox, unpatchify)

__all__ = [
    "MaskedAutoencoder", "ModelConfig", "abstract_params", "build_model",
    "encode_flops_per_sample", "forward_flops_per_sample", "mask_from_ids", "masked_mse",
    "masking_ids_from_noise", "masking_noise", "param_shapes", "parameter_counts",
    "patch_statistics", "patch_targets", "patchify", "positional_table_size",
    "random_masking_ids", "resolve_model_config", "restore_ids_from_keep",
    "train_flops_per_sample", "unbox", "unpatchify",
]
