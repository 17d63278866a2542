"""threadline: a runtime for LLM agent conversations on self-hosted model servers.

The shared kernel: generated contracts (`threadline.v1`), config, logging, the
gRPC server bootstrap, the event bus, the gateway client and the CLI.
"""

__version__ = "0.1.0"
