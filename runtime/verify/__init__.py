"""Verified inference: what model served a reply, checked cheaply (see docs/verified-inference.md).

- :mod:`runtime.verify.identity`: a GGUF file's sha256 (hashed once per path, size and mtime).
- :mod:`runtime.verify.commitment`: per produced position the top-k token ids and logprobs, encoded
  per chunk of tokens and hashed into a Merkle root; openings of chunks against that root.
- :mod:`runtime.verify.check`: one prefill pass of the same GGUF over prompt + completion and the
  comparison of every opened position with it.
"""
