"""DICOMweb (PS3.18): the attributes the index keeps per level, QIDO-RS query parsing and the
multipart framing of WADO-RS. Pure: no aiohttp, no backend; ``http/dicomweb.py`` serves it."""
