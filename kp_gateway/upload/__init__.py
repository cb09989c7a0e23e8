"""HTTP uploads: the upload record, content sniffing, safe zips, the importer into the pipeline,
the NIfTI adapter, and the upload service with its routes."""
