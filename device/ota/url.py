# URLs of the agent's sources: split into what a connection needs, and a reference (a Location
# header, a manifest's payload.url, rollout.json) resolved against the URL it came from. Pure
# string work, loaded without the HTTP client (ota/offer.py resolves the payload's URL in the
# manifest stage, so the payload stage does not load the client for it).


def split_url(url):
    # "http://host:port/path" -> (https?, host, port, "/path"); ValueError if malformed.
    if url.startswith("http://"):
        tls, rest, port = False, url[7:], 80
    elif url.startswith("https://"):
        tls, rest, port = True, url[8:], 443
    else:
        raise ValueError(url)
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    if ":" in hostport:
        host, p = hostport.rsplit(":", 1)
        port = int(p)
    else:
        host = hostport
    if not host or not 0 < port < 65536 or " " in path or "\r" in path or "\n" in path:
        raise ValueError(url)
    return tls, host, port, path


def join(base, ref):
    # A Location or payload URL relative to `base`. A URL with a scheme ("ftp://...") is
    # absolute: returned as it is, for split_url to refuse.
    i = ref.find("://")
    if i > 0 and "/" not in ref[:i]:
        return ref
    if base.startswith("serial:"):  # a release pushed over the serial link (ota/link.py)
        return base[:base.rfind("/") + 1] + ref
    tls, host, port, path = split_url(base)
    root = ("https://" if tls else "http://") + host + ":" + str(port)
    if ref.startswith("/"):
        return root + ref
    return root + path[:path.rfind("/") + 1] + ref
