"""Series validation: running and parsing dciodvfy (dicom3tools), and the HTML report."""
