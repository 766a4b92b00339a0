"""Developer tools that the suite also runs (see tests/tools/import_graph.py)."""
