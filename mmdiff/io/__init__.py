"""File I/O every layer shares: atomic writes, safe weight loading, image and user text files."""
