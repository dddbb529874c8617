"""`python -m ray_jobs.train --run RUN.yaml`: staged training (ray_jobs.train.driver)."""

import sys


def _spec_refused(argv: list[str]) -> bool:
    """Whether --run names a spec that can never run, checked (and its problems printed) before
    the trainer imports torch and Ray, which takes seconds: a bad spec is refused at once."""
    if "--run" not in argv or argv.index("--run") + 1 >= len(argv):
        return False  # the driver's own argument parsing says what is missing
    from specs.loading import load_or_report
    from specs.run import RunSpec

    return load_or_report(argv[argv.index("--run") + 1], RunSpec) is None


if _spec_refused(sys.argv[1:]):
    sys.exit(2)

from ray_jobs.train.driver import main  # noqa: E402

sys.exit(main())
