"""Systems: the :class:`~mmdiff.systems.base.System` contract and one LightningModule per file,
registered by name (:mod:`mmdiff.systems.registry`). Nothing is imported here, so config checks can
read the registry without loading torch."""
