"""Make the spawned-world helpers importable by name from this directory (and in spawned children)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
