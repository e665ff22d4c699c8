"""Performance figures of the factory, measured on the machine at hand (never asserted in CI).

python -m benchmarks [--quick] [--json FILE]      every figure side by side, one table (benchmarks/suite.py)
python -m benchmarks.bench_color [--quick]        one figure's module on its own (also bench_stream, ...)
"""
