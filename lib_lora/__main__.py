"""`python -m lib_lora inspect|merge|train|quickstart ...` (see lib_lora/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
