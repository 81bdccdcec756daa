"""napari plugin: open medical images with their geometry, segment them with medsa.

Installed with ``pip install -e ".[napari]"`` (napari and a Qt binding); the rest of medsa never
imports napari. npe2 finds the manifest ``napari.yaml`` through the ``napari.manifest`` entry point.

- :mod:`medsa.napari._io`: reader for everything :func:`medsa.data.io.read_image` reads (scale =
  spacing, source geometry in the layer metadata) and the Labels writer (same geometry; DICOM-SEG
  for ``.dcm``).
- :mod:`medsa.napari._session`: the Qt-free segmentation state (model, embedding cache, prompts per
  object, propagation), so it can be tested without a display.
- :mod:`medsa.napari._widget`: the dock widget.

See docs/napari.md.
"""
