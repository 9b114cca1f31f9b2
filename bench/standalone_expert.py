"""One independent process serving the sentiment model: what expertd replaces.

Imports TensorFlow, reads and builds the shipped model, answers once, prints
"ready", then waits for stdin to close (bench/memory.py runs several side by
side).  With ``--once TEXT`` it prints the opinion on TEXT and exits: the
fresh-process expert of a stdin/stdout pipeline (bench/compare.py times it).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import sentiment

sentiment.read_model()
sentiment.build_model()
if sys.argv[1:2] == ["--once"]:
    # The stdin/stdout expert expertd replaces: one document in, one opinion out, exit.
    print(sentiment.opinion({"text": " ".join(sys.argv[2:]) or "what a wonderful day"}), flush=True)
    sys.exit(0)
sentiment.opinion({"text": "warming up"})
print("ready", flush=True)
sys.stdin.read()
