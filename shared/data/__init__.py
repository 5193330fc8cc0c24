"""A party's own data: reading tables with errors that name the file and column (`tables`), the public schema
each data folder declares (`schema`), and the arrays a party trains on (`party_data`)."""
