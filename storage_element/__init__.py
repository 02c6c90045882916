"""The storage element (``panda se``): a folder served over HTTP/WebDAV, the peer of the ``http``
and ``gfal`` copytools, of ARC CE's push mode and of the demo. Its own package, with its own extra
(``pip install 'panda-wms[se]'``, Tornado), so that a worker node's install needs no server."""
