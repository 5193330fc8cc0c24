"""Generated gRPC stubs for proto/fedscore_scoring.proto (do not edit; regenerate with scripts/gen_proto.sh)."""
