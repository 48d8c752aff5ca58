"""Sim stage: the simulated room the sample episodes are drawn in (scene, camera, teleop operator)
as a gymnasium environment, model-free driving baselines, closed-loop rollouts and their
pictures. Imports the data stage only."""
