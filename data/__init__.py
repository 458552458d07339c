"""Data sources named by purpose. `data.toy` holds the bundled toy datasets (nothing is downloaded)."""
