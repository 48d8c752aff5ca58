"""Drives `vla-pipeline serve` with openpi's own client (`openpi_client.WebsocketClientPolicy`).

Run by tests/test_serve.py with the interpreter of .venv-openpi (openpi-client needs NumPy < 2,
so it lives apart from the project's environment). Writes one JSON object to stdout.

    python openpi_drive.py episode URI KEY FRAMES.npz INSTRUCTION COLOUR_ORDER  -> {"actions": [...], "metadata": {...}}
    python openpi_drive.py bad URI KEY FRAMES.npz                                -> {"errors": [...], "after": [...]}
    python openpi_drive.py connect URI KEY                                      -> {"refused": "..."} or {"metadata": ...}
    python openpi_drive.py hang URI KEY FRAMES.npz    (sends one frame, prints "sent", then waits to be killed)
"""

import json
import sys
import time

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy


def client(uri: str, key: str) -> WebsocketClientPolicy:
    return WebsocketClientPolicy(uri, api_key=key or None)


def main() -> None:
    mode, uri, key = sys.argv[1:4]
    if mode == "connect":
        try:
            policy = client(uri, key)
        except Exception as error:  # websockets' InvalidStatus: refused in the handshake
            print(json.dumps({"refused": f"{type(error).__name__}: {error}"}))
            return
        print(json.dumps({"metadata": policy.get_server_metadata()}))
        return
    frames = np.load(sys.argv[4])["frames"]
    policy = client(uri, key)
    if mode == "episode":
        instruction, order = sys.argv[5], sys.argv[6]
        actions = [policy.infer({"image": frame, "instruction": instruction, "colour_order": order,
                                 "reset": index == 0})["actions"].tolist()
                   for index, frame in enumerate(frames)]
        print(json.dumps({"actions": actions, "metadata": policy.get_server_metadata()}))
    elif mode == "bad":
        good = {"image": frames[0], "instruction": "go"}
        bad = [
            {"instruction": "go"},  # no image
            {"image": frames[0]},  # no instruction
            {"image": frames[0], "instruction": 7},  # ill-typed instruction
            {"image": frames[0].astype(np.float32), "instruction": "go"},  # wrong dtype
            {"image": frames[0][..., 0], "instruction": "go"},  # wrong shape
            {"image": frames[0], "instruction": "go", "colour_order": "CMYK"},
            {"image": frames[0], "instruction": "go", "reset": "yes"},
            {"image": np.zeros((480, 640, 3), np.uint8), "instruction": "go"},  # over the test server's 0.5 MiB
        ]
        errors, after = [], []
        for request in bad:
            try:
                policy.infer(request)
                errors.append(None)
            except RuntimeError as error:
                errors.append(str(error))
            after.append(policy.infer(good)["actions"].tolist())  # the connection still serves
        print(json.dumps({"errors": errors, "after": after}))
    elif mode == "hang":
        policy._ws.send(policy._packer.pack({"image": frames[0], "instruction": "go"}))
        print("sent", flush=True)
        time.sleep(120)


if __name__ == "__main__":
    main()
