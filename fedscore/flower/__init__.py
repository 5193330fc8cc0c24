"""The glue between fedscore and Flower, in one place: what is patched in Flower (`patches`, one version guard),
how its processes start faster (`supernode`, `forkserver`, `flwr_run`: the same Flower code, started warm or with
lighter imports), how every process of a federation is tied, supervised and stopped (`processes`), and how a run is
launched (`launch`)."""
