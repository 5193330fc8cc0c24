"""fedscore command line and data tooling (synthetic default data, UCI conversion, federation launcher)."""
