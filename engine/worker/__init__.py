"""The process around one engine: its loop thread, the prefill and decode roles, the gRPC
servicer and its peers, semi-PD, and `build_worker`, which assembles them from a config."""
