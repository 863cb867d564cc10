# Small JSON documents: parsed with a bound on nesting (and, for bytes nobody has authenticated
# yet, on their number of values); files on the device filesystem read with a bound on size,
# and written with a CRC so that a torn write is recognised.
import json
import os

_DEPTH_MAX = 16  # deeper than any document of ours


def loads(data, items=None):
    # json.loads, except that a document nested deeper than _DEPTH_MAX (hostile: "[[[[...")
    # raises ValueError like any other bad JSON; MicroPython's parser keeps a heap object per
    # level and runs out of heap on it (2000 levels fit in 4 KiB) instead. For our own files
    # the depth is counted only then, so a good document costs nothing more. For bytes nobody
    # has authenticated yet (`items` given: the DSSE envelope) the shape is checked first: at
    # most `items` values and containers, so that 4 KiB of "[],[],[]..." or "1,1,1..." is a bad
    # document, not thousands of heap objects before any signature is looked at.
    b = data if isinstance(data, (bytes, bytearray, memoryview)) else data.encode()
    if items is not None and _shape(b, items):
        raise ValueError("JSON document larger than expected")
    try:
        return json.loads(data)
    except MemoryError:
        if _shape(b, 1 << 30):
            raise ValueError("JSON nested too deep")
        raise


def _shape(b, items):
    # True if `b` nests deeper than _DEPTH_MAX or has more than `items` values and containers
    # (counted by their separators: "," and ":" outside strings, and "[" and "{").
    depth = 0
    n = 0
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
            n += 1
            if depth > _DEPTH_MAX or n > items:
                return True
        elif c == 0x5D or c == 0x7D:  # ] }
            depth -= 1
        elif c == 0x2C or c == 0x3A:  # , :
            n += 1
            if n > items:
                return True
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


def read_sealed(path, limit):
    # A file write_sealed() wrote: the JSON, a newline, the CRC-32 of the JSON in hex. None if
    # it is missing, torn (a power cut while it was written), corrupt or larger than `limit`.
    try:
        if os.stat(path)[6] > limit:
            return None
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    i = data.rfind(b"\n")
    from binascii import crc32
    try:
        if i < 0 or int(data[i + 1:], 16) != crc32(data[:i]) & 0xFFFFFFFF:
            return None
        return loads(data[:i])
    except ValueError:
        return None


def write_sealed(path, obj):
    # Written in place, with a CRC: a torn write is recognised by read_sealed(). Used in pairs
    # (state.py), never renamed: on FAT a rename over a file is a remove then a rename, and a
    # power cut between the two loses both.
    from binascii import crc32
    data = json.dumps(obj)  # a str is written and hashed as its UTF-8 bytes: no copy of it is made
    with open(path, "wb") as f:
        f.write(data)
        f.write(b"\n%08x" % (crc32(data) & 0xFFFFFFFF))
