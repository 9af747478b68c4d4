"""Readers for each file format a lab archive holds; `open_volume` picks one.

One module per format family (zarr_store: zarr v2/v3, N5, OME-Zarr; hdf5; tiff;
image_stack: PNG/TIFF/JPEG folders; mrc). `open.FORMATS` is the table that maps a path
to its reader.
"""

from ssl_em.data.readers.open import FORMATS, detect_format, open_volume, source_fingerprint

__all__ = ["FORMATS", "detect_format", "open_volume", "source_fingerprint"]
