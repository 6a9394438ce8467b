"""CPU benchmarks of the reference implementations (run as ``python -m benchmarks.NAME``).

Results are written as JSON to ``benchmarks/results/<name>.json`` with a description of the machine.
"""
