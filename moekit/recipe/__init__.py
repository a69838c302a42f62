"""Recipe: one typed, validated description of what to build."""

from .recipe import METHODS, ModelSource, Recipe, load_recipe, parse_size

__all__ = ["METHODS", "ModelSource", "Recipe", "load_recipe", "parse_size"]
