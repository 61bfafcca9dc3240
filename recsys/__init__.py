"""recsys: fine-tune a pretrained text encoder on a shop's behaviour logs and serve it."""

from __future__ import annotations

__version__ = "0.1.0"
