"""The lender: applicant features and labels -> top model; returns gradients for the embeddings."""
