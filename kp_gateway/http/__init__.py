"""The HTTP side: the aiohttp application, its routes, shared responses and the static files of
the pages (``static/``); handlers run on the event loop."""
