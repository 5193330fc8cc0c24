"""Generated gRPC stubs for proto/fedscore_scoring.proto, imported by both parties from here (do not edit;
regenerate with scripts/gen_proto.sh)."""
