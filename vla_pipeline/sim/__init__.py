"""Sim stage: the simulated room the sample episodes are drawn in (scene, camera, teleop operator)
as a gymnasium environment, model-free driving baselines, closed-loop rollouts and their
pictures. Imports the data stage only.

Importing it registers the environment as "vla_pipeline/BoxNav-v0" (gymnasium.make)."""

import gymnasium

from .env import ENV_ID, MAX_PRESSES

if ENV_ID not in gymnasium.registry:  # a second import (or a reload) must not register twice
    gymnasium.register(id=ENV_ID, entry_point="vla_pipeline.sim.env:BoxNavEnv", max_episode_steps=MAX_PRESSES)
