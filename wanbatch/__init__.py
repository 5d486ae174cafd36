"""wanbatch: batch image generation for the Wan text-to-image models, resumable and paid once."""

__version__ = "0.1.0"
