"""Parts both parties and the coordinator use: config and message schemas, model blocks, metrics, splits."""
