"""Private ID alignment: ECDH private set intersection (openmined-psi) for training and for the blacklist check
(`psi`, on IDs checked by `ids`), and the keyed tokens both parties order their aligned users by (`tokens`, training
only)."""
