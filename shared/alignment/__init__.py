"""Private ID alignment: ECDH private set intersection (openmined-psi) for training and for the blacklist check,
with the keyed tokens both parties order their aligned users by (`psi`)."""
