import os
import sys

# The multi-process harness is imported by test modules and by the processes it spawns.
sys.path.insert(0, os.path.dirname(__file__))
