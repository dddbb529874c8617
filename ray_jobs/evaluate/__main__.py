"""`python -m ray_jobs.evaluate --checkpoint DIR ...` (ray_jobs.eval.cli)."""

import sys

from ray_jobs.eval.cli import main

sys.exit(main())
