"""The consumer side: the render task, the pinned pipeline, encoding, generated models."""

import os

# Read by transformers/diffusers when they are first imported: their import-time notices and
# loading bars say nothing about jobs. A user's own setting wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
