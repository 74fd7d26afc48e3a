"""hf:// and s3:// locations: fetching inputs and publishing outputs."""
