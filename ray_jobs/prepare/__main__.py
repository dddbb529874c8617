"""`python -m ray_jobs.prepare --run RUN.yaml [--force]` (ray_jobs.data.prepare)."""

import sys

from ray_jobs.data.prepare import main

sys.exit(main())
