"""The errors of data that cannot be used, in a module of their own so that the records (`load_image`) and the
split loaders raise the same types without importing each other. The CLI prints a `DatasetError` as one
`data error: ...` line and exits with status 2."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be loaded, or an image that cannot be read; the message names the file, the row
    and the field."""


class ImageNotFoundError(DatasetError, FileNotFoundError):
    """An example's image file does not exist; also a FileNotFoundError, which is what it is."""
