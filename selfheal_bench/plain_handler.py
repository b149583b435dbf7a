"""The baseline for scripts/bench_serve.py: the same JSON-array handler, without selfheal.

Same request and response shape as the stock selfheal handler, so the benchmark
compares like with like.
"""
from selfheal_torchserve.json_handler import JSONArrayHandler


class PlainHandler(JSONArrayHandler):
    """JSON arrays in, predictions out; nothing else."""
