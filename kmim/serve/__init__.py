"""``kmim serve``: a read-only HTTP server for a committed dataset and its report.

``files.py`` is the table of what may be served (the manifest-listed files of a dataset, the report's
``index.html`` and the PNGs it names) and reads byte ranges of them; ``ranges.py`` parses HTTP ``Range``
headers; ``app.py`` is the ASGI application (routes, auth, conditional and range responses); ``server.py``
builds both tables and runs the application under uvicorn.
"""
