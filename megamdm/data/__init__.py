"""Data: webdataset tars -> DALI -> token shards (zarr) -> training batches."""
