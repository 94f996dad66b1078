"""The image file and the map of what changed in it.

Blocking calls only; the Twisted layers decide which thread runs them.
"""

from ferry.storage.dirtymap import DEFAULT_GRANULARITY, DirtyMap, DirtySnapshot
from ferry.storage.image import Extent, Image, ImageError, ZeroingNotFast

__all__ = [
    "DEFAULT_GRANULARITY",
    "DirtyMap",
    "DirtySnapshot",
    "Extent",
    "Image",
    "ImageError",
    "ZeroingNotFast",
]
