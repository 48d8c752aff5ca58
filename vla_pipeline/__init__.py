"""Mobile VLA pipeline: teleop HDF5 episodes → Zarr window store → Kosmos-2 LoRA policy."""

__version__ = "0.1.0"
