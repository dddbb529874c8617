"""`python -m ray_jobs.preflight --run RUN.yaml --cluster CLUSTER.yaml`: the preflight job."""

import sys

from ray_jobs.preflight.job import main

sys.exit(main())
