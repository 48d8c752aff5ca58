from .compute import ComputeResource
from .storage import EpisodeFolder, WindowStoreResource

__all__ = ["ComputeResource", "EpisodeFolder", "WindowStoreResource"]
