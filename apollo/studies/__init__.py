"""Studies: comparisons and reports built on the library, leaves that no library module imports.

Each study has an entry point `python -m experiments.NAME` and writes its results
(JSON, a Markdown table, plots) into a workdir.
"""
