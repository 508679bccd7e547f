"""Unlearning methods: NHLE fine-tuning (`nhle.core.unlearning.nhle`) and class weight masking
(`nhle.core.unlearning.masking`). Plain functions on torch modules; no tracking or orchestration."""

from nhle.core.unlearning.masking import MaskSnapshot, apply_class_weight_mask, without_mask
from nhle.core.unlearning.nhle import UnlearnResult, nhle_loss, unlearn

__all__ = ["MaskSnapshot", "UnlearnResult", "apply_class_weight_mask", "nhle_loss", "unlearn", "without_mask"]
