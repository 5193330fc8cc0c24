"""The parties: each folder holds one party's data loading, model part and message handlers."""
