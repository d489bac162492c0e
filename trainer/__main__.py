"""`python -m face_consistency.trainer ...` (also under `accelerate launch -m`)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
