"""Recipe: one typed, validated description of what to build."""

from .recipe import ModelSource, Recipe, load_recipe, parse_size

__all__ = ["ModelSource", "Recipe", "load_recipe", "parse_size"]
