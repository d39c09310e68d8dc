"""Sources of the Triton model repository that `blip2-triton export` writes (thin model.py files)."""
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
