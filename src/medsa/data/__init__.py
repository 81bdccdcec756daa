"""medsa.data: medical image I/O, dataset layouts, preprocessing, prompt simulation, checks.

Sub-modules (imported explicitly, so ``import medsa.data`` stays light):

- :mod:`medsa.data.io`: ``read_image`` / ``write_image`` with geometry (``Image``)
- :mod:`medsa.data.datasets`: ``load_dataset``, ``Case``, ``SliceDataset2D``, ``ChunkDataset3D``, splits
- :mod:`medsa.data.preprocess`: SAM resize/normalise and inverse, CT windows, 3D chunks
- :mod:`medsa.data.prompts`: 1pt / 3pt / bbox0.5 / bbox0.75 / box / everything, ``next_click``
- :mod:`medsa.data.check`: ``medsa check-data``

See docs/data.md.
"""
