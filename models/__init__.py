"""Language models built from a config's mixer pattern, and their decode caches."""

from models.lm import LM, ModelCache, build_model, lm_loss

__all__ = ["LM", "ModelCache", "build_model", "lm_loss"]
