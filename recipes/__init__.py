"""Shipped recipes, importable as `rlhf_recipes.recipes.<name>`; each defines a module-level `recipe`."""
