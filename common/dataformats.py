"""Kept for imports written before `fedsilo.common.datasets` became a package: the readers live there now."""

from fedsilo.common.datasets.csvfiles import (  # noqa: F401
    CSV_CACHE_ENTRIES,
    CSV_CACHE_MAX_FILE,
    MISSING_MARKERS,
    missing_counts,
    read_csv,
)
from fedsilo.common.datasets.imagefiles import IMAGE_EXTENSIONS, list_image_folder, load_image_array  # noqa: F401
from fedsilo.common.datasets.registry import DatasetFormatError  # noqa: F401
