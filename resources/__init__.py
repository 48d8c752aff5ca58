from .storage import EpisodeFolder, WindowStoreResource

__all__ = ["EpisodeFolder", "WindowStoreResource"]
