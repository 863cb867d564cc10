"""`python -m mpota`: the same as the `mpota` command."""
import sys

from .cli import main

sys.exit(main())
