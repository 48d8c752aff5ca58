"""Policy stage: the one PolicyConfig, the prompt and image/action normalisation, the Kosmos-2
policy with its action token and head, and the streaming policy that serves it on the robot.
Imports the data stage only."""
