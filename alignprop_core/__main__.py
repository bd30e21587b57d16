"""`python -m alignprop_core train|demo ...` (same as the `alignprop` command)."""
import sys

from .cli import main

sys.exit(main())
