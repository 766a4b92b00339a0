"""A model's layers on other machines: llama.cpp's RPC backend (ggml-rpc), driven through ctypes.

``rpc`` finds the ggml-rpc library of the installed llama.cpp and names its devices, ``server`` runs
the RPC server as a process of its own (sandboxed, reachable through one unix socket only), ``meter``
reads the client's command stream (bytes, graph computations, tokens), ``model`` loads a GGUF with
its layers placed on RPC servers. Nothing here knows libp2p: the tunnel is protocols/lease/layers.py.
"""
