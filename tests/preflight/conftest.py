"""Make the preflight rank bodies importable by name from here (and in spawned children)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
