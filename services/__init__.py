"""threadline services: one package per gRPC service."""
