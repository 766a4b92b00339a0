import os

# ggml's abort handler forks gdb, and orphaned children can hang a test run.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")
