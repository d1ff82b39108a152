"""Generated gRPC modules of the worker service (`make proto` from proto/pdserve_rpc/*.proto).

Named so that it cannot clash with `proto`, the import name of proto-plus that ray[default]
installs. Only engine/server.py and the worker client touch these types.
"""
