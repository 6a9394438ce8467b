"""Tiny diffusers components, the offline tokenizer, pretraining and checkpoint loading.

Imports flow one way: ``worlds`` -> ``models`` -> ``sampling`` -> ``rewards`` -> ``algorithms``.
"""

from reference_impls.models.loading import SHIPPED_MODELS, load_policy
from reference_impls.models.policy import GenerativePolicy

__all__ = ["GenerativePolicy", "SHIPPED_MODELS", "load_policy"]
