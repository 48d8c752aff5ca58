"""Data stage: the episode schema, reading and validating the collector's HDF5 files, the Zarr
window store and ingest into it, per-episode action statistics, the store's data contracts and
the drop-folder scan. Imports no other stage."""
