"""Converters from other inference formats to transformers `save_pretrained` directories.

Each converter reads a foreign checkpoint by hand (no foreign runtime at run time) and writes a
directory that `from_pretrained` loads offline; the caller (a weight source) owns atomicity and caching.
"""
