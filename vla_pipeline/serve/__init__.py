"""Stage 6: the policy on the network: the WebSocket server robots stream frames to, its wire
format (msgpack, openpi-client's array encoding) and a robot-side client."""
