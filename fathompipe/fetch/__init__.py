"""Fetching the images of a download shard: records, the HTTP client with retries and verification, processes."""
