"""The zarr job store: layout, manifest, completion markers, stats, blobs and the lock. Imports
only fsutil.py, dtypes.py and errors.py: engine/, export/ and routing/ build on it."""
