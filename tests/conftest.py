import os
import sys

# tools/ holds the tree snapshot, workload and checker helpers the tests use
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
