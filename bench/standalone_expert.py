"""One independent process serving the sentiment model: what expertd replaces.

Imports TensorFlow, reads and builds the shipped model, answers once, prints
"ready", then waits for stdin to close.  bench/memory.py runs several of these
side by side to measure what independent processes cost.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import sentiment

sentiment.read_model()
sentiment.build_model()
sentiment.opinion({"text": "warming up"})
print("ready", flush=True)
sys.stdin.read()
