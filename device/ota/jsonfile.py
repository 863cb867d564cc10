# Small JSON files on the device filesystem: bounded reads and atomic writes.
import json
import os


def read(path, limit):
    # The parsed JSON of `path`, or None if it is missing. ValueError if it is larger than
    # `limit` bytes or not JSON: a hostile or corrupt file never makes us read it all.
    try:
        size = os.stat(path)[6]
    except OSError:
        return None
    if size > limit:
        raise ValueError("file too large")
    with open(path) as f:
        return json.loads(f.read())


def write(path, obj):
    # Atomic replace: write a temp file, then rename it over the old one. littlefs (the
    # default ESP32 filesystem) and POSIX rename atomically; FAT refuses to rename over an
    # existing file, so there we remove first (read() falls back to the temp file).
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
    try:
        os.rename(tmp, path)
    except OSError:
        os.remove(path)
        os.rename(tmp, path)
