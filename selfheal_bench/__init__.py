"""Demo and benchmark material: the digits data, its corruptions and the demo CNN.

Not part of the core library; scripts and tests share it so that the demo,
the benchmarks and the integration tests all see the same streams.
"""
