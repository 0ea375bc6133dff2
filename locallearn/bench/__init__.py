"""Benchmarks: memory, speed and accuracy of every method against ``bp`` and activation checkpointing.

Lives inside the package (not only under ``benchmarks/``) so that ``locallearn bench ...`` works from
any installed copy, and so tests import it like any other module; ``benchmarks/*.py`` are thin scripts
over these modules. Nothing here prints: each benchmark returns its Markdown report and the CLI prints it.
"""
