import os
import sys

# Shared helpers (rule_table.py, reference64.py) are imported by name from tests/unit, tests/dist and
# tests/docs, and by the processes adams_dist.testing.run spawns (they inherit this sys.path).
sys.path.insert(0, os.path.dirname(__file__))
