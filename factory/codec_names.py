"""The payload codecs of the shards (factory.shards), by name, with the extension of their payload members.

Apart from `factory.shards` (which imports it) so that the command line can offer the names without importing numpy,
Pillow and zstandard.
"""

CODECS: dict[str, str] = {"png": "png", "zst": "npy.zst"}  # codec name -> payload extension
