"""Private ID alignment: ECDH private set intersection for training and for the blacklist check (`psi`, over X25519
in `x25519` by default or openmined-psi, on IDs checked by `ids`), and the keyed tokens both parties order their
aligned users by (`tokens`, training only)."""
