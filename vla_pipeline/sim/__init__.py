"""Sim stage: the simulated room the sample episodes are drawn in (scene, camera, teleop operator)
as a gymnasium environment, model-free driving baselines, closed-loop rollouts and their
pictures. Imports the data stage only.

Importing it registers the environments "vla_pipeline/BoxNav-v0" and "vla_pipeline/BoxNav-v1"
(gymnasium.make)."""

import gymnasium

from . import varied
from .env import ENV_ID, MAX_PRESSES, SIGHT_ENV_ID

for _id, _presses in ((ENV_ID, MAX_PRESSES), (SIGHT_ENV_ID, varied.MAX_PRESSES)):
    if _id not in gymnasium.registry:  # a second import (or a reload) must not register twice
        gymnasium.register(id=_id, entry_point="vla_pipeline.sim.env:BoxNavEnv", max_episode_steps=_presses,
                           kwargs={"world": _id})
