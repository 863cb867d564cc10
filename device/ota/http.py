# HTTP GET for the agent, over micropython-lib `requests` (frozen into stock ESP32 and unix
# builds). We keep only the response headers we use, so a chatty or hostile server cannot
# fill the heap with headers, and map every failure to a transport error code.
from ota.errors import OtaError, TRANSPORT

_KEEP = (b"content-length", b"content-range", b"etag", b"retry-after")


def _keep_headers(line, d):
    i = line.find(b":")
    if i <= 0:
        return
    k = line[:i].strip().lower()
    if k in _KEEP and len(d) < 8:
        d[k.decode()] = line[i + 1:].strip()[:64].decode()


def get(url, timeout_s, start=0):
    # Returns the open response (status 200 or 206); read the body from resp.raw.
    import requests
    headers = {}
    if start:
        headers["Range"] = "bytes=%d-" % start
    try:
        resp = requests.request("GET", url, headers=headers, timeout=timeout_s,
                                parse_headers=_keep_headers)
    except OSError as e:
        raise OtaError("network", "%s: %r" % (url, e), TRANSPORT)
    except (ValueError, NotImplementedError, IndexError, RuntimeError) as e:
        raise OtaError("bad-response", "%s: %r" % (url, e), TRANSPORT)
    if resp.status_code != 200 and resp.status_code != 206:
        code = resp.status_code
        resp.close()
        raise OtaError("http-%d" % code, "GET %s answered %d" % (url, code), TRANSPORT)
    return resp


def content_length(resp):
    v = resp.headers.get("content-length")
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise OtaError("bad-response", "Content-Length %r" % v, TRANSPORT)
    if n < 0:
        raise OtaError("bad-response", "Content-Length %r" % v, TRANSPORT)
    return n


def readinto_full(raw, mv):
    # Fill `mv` from the socket; returns how many bytes arrived before the end of the body.
    n = 0
    want = len(mv)
    try:
        while n < want:
            k = raw.readinto(mv[n:])
            if not k:
                break
            n += k
    except OSError as e:
        raise OtaError("network", "connection failed after %d bytes: %r" % (n, e), TRANSPORT)
    return n
