"""Benchmarks: ``zoo bench <name>`` runs ``zoo.bench.<name>.main(argv)``.

Every figure is taken the same way (docs/benchmarks.md): ours and the peer in the same process,
interleaved (A B A B ...), after warm-up, median of at least 5 runs each, printed with the ratio.
"""
