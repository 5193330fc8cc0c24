"""The payment-data holder: transactions -> features -> bottom model -> embeddings."""
