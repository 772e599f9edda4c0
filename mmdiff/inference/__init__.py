"""Using trained systems: the Python API, sample and caption files, unCLIP, export and model card."""
