"""`python -m ray_jobs.train --run RUN.yaml`: staged training (ray_jobs.train.driver)."""

import sys

from ray_jobs.train.driver import main

sys.exit(main())
