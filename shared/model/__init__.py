"""The model both parties train and ship: the two parts (`parts`), the preprocessing that travels inside them
(`preprocessing`), their ONNX export and manifest (`export_onnx`, `manifest`), and the reference models the
operator's baselines use (`reference_models`)."""
