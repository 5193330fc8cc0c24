"""Each party's own data on disk: the declared schema (`schema`), the file readers and their errors (`tables`), and
the table a party loads for training or scoring (`party_data`)."""
