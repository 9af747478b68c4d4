"""ssl_em in napari (npe2 plugin, manifest `napari.yaml`; install with `pip install "ssl_em[napari]"`).

- `widget.FinetuneWidget`: paint a few slices, fine-tune, predict, measure, save a model
  folder `ssl-em predict` runs.
- `reader.get_reader`: opens an `ssl-em predict` output (OUT.zarr) with its labels shown and
  named by class.

Nothing here is imported by the rest of ssl_em: napari and Qt stay optional.
"""
