"""The config a workdir holds (its config.json), to continue or fine-tune the run in it.

    python -m experiments.train --config=experiments/configs/workdir.py:runs/imported --workdir=runs/imported \
        --config.num_train_steps=2000

Written for workdirs that `experiments.import_checkpoint` makes, it reads any run's config.json.
The fields are those of `defaults.base_config()` with the workdir's values on top, so that
`--config.*` overrides work as with any other config; keys this version no longer has are dropped
with a warning.
"""

import json
import os

import ml_collections
from absl import logging

from experiments.configs import defaults


def get_config(workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a workdir (trained or imported)?")
    with open(path) as f:
        saved = json.load(f)
    config = defaults.base_config()
    _update(config, saved, "config")
    return config


def _update(config: ml_collections.ConfigDict, values: dict, where: str) -> None:
    for key, value in values.items():
        if key not in config:
            logging.warning("%s.%s (in config.json) is not a field of this version: dropped.", where, key)
            continue
        current = config[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            _update(current, value, f"{where}.{key}")
        elif isinstance(current, ml_collections.ConfigDict) or isinstance(value, dict):
            config[key] = value  # a section that is free-form in one of the two
        else:
            config[key] = tuple(value) if isinstance(value, list) else value
