"""The `streammerge` command line: plan, build, status, export, extract-lora, report, methods
(merge.py), router, generate, serve (inference.py), on the group of main.py."""

from . import inference, merge  # noqa: F401  (each registers its commands on `main`)
from .main import SIZE, human, main, parse_size

__all__ = ["SIZE", "human", "main", "parse_size"]

if __name__ == "__main__":
    main()
