"""Datasets for thaw-rl recipes: built-in offline tasks and loading through ``datasets``.

    from thaw_rl.data import DatasetSpec, load_recipe_datasets
    train, test = load_recipe_datasets(DatasetSpec("builtin:arithmetic", num_examples=500))
"""

from thaw_rl.data.builtin_tasks import (
    BUILTIN_TASKS,
    builtin_choices,
    builtin_rows,
    is_builtin,
)
from thaw_rl.data.dataset_loading import DatasetSpec, load_recipe_datasets

__all__ = ["BUILTIN_TASKS", "DatasetSpec", "builtin_choices", "builtin_rows", "is_builtin", "load_recipe_datasets"]
