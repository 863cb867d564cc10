# Small JSON documents: parsed with a bound on nesting; files on the device filesystem read
# with a bound on size and written atomically.
import json
import os

_DEPTH_MAX = 16  # deeper than any document of ours


def loads(data):
    # json.loads, except that a document nested deeper than _DEPTH_MAX (hostile: "[[[[...")
    # raises ValueError like any other bad JSON; MicroPython's parser keeps a heap object per
    # level and runs out of heap on it (2000 levels fit in 4 KiB) instead. The depth is
    # counted only then, so a good document costs nothing more.
    try:
        return json.loads(data)
    except MemoryError:
        if _too_deep(data if isinstance(data, (bytes, bytearray, memoryview)) else data.encode()):
            raise ValueError("JSON nested too deep")
        raise


def _too_deep(b):
    depth = 0
    in_str = False
    esc = False
    for c in b:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x5B or c == 0x7B:  # [ {
            depth += 1
            if depth > _DEPTH_MAX:
                return True
        elif c == 0x5D or c == 0x7D:  # ] }
            depth -= 1
    return False


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
        return loads(f.read())


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
