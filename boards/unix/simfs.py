# The simulated device's filesystem. By default it is a directory of the host (devices/NAME/fs/),
# fast and easy to look into. With MPOTA_FS=littlefs or MPOTA_FS=fat it is what MicroPython's
# ESP32 port mounts: a real VfsLfs2 or VfsFat on the flash's "vfs" partition (ports/esp32/
# modules/_boot.py mounts flashbdev's Partition.find(TYPE_DATA, label="vfs", block_size=4096);
# inisetup.py formats LittleFS). Every write of a file is then flash erases and writes that the
# power-loss sweep can cut, and a rename behaves as the filesystem's does: VfsFat.rename removes
# an existing target, then renames (two steps); LittleFS renames atomically.
# The simulator mounts it at /flash and makes it the working directory (the unix port's own root
# stays the host's, where the agent's code is: as frozen code on a board).
#     micropython -m simfs mkfs | put NAME HOSTFILE | get NAME | ls
import os

MOUNT = "/flash"


def kind():
    k = os.getenv("MPOTA_FS") or "host"
    return k if k in ("fat", "littlefs") else "host"


def _cls():
    import vfs
    return vfs.VfsFat if kind() == "fat" else vfs.VfsLfs2


def _bdev():
    import esp32
    return esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs", block_size=4096)[0]


def mount():
    # The device filesystem as the working directory; nothing to do for a host directory.
    if kind() == "host":
        return
    import vfs
    vfs.mount(_cls()(_bdev()), MOUNT)
    os.chdir(MOUNT)


def mkfs():
    _cls().mkfs(_bdev())


def _main():
    import sys
    cmd = sys.argv[1:]
    if cmd[:1] == ["mkfs"]:
        mkfs()
        return
    mount()
    if cmd[:1] == ["put"]:
        with open(cmd[2], "rb") as src, open(cmd[1], "wb") as dst:
            dst.write(src.read())
    elif cmd[:1] == ["get"]:
        try:
            with open(cmd[1], "rb") as f:
                sys.stdout.buffer.write(f.read())
        except OSError:
            sys.exit(2)
    elif cmd[:1] == ["rm"]:
        try:
            os.remove(cmd[1])
        except OSError:
            pass
    elif cmd[:1] == ["ls"]:
        print(" ".join(sorted(os.listdir())))


if __name__ == "__main__":
    _main()
